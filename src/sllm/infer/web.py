"""The single-page web chat `sllm serve` shows at `/`: inline HTML, CSS and JavaScript.

No build step and no external assets, so it works on a machine without internet. The page
keeps the conversation in the browser, sends it to `/v1/chat/completions` with
`stream: true`, and appends each Server-Sent Event's text (or error) to the reply as it
arrives. When the conversation outgrows the context, the oldest exchanges are dropped with a
notice, as `sllm chat` does. Replies ask for at most `REPLY_TOKENS`, or the server's `--max-tokens-limit` when
that is lower, so the page never sends a request its own server refuses. It sets no sampling
option, so the replies follow the run's `sample` section, as in `sllm chat`.
"""

REPLY_TOKENS = 200

_PAGE = """<!doctype html>
<html lang="ko">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sllm chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 0 auto; padding: 1rem; }
  #log { min-height: 50vh; }
  .message { white-space: pre-wrap; padding: .5rem .75rem; margin: .5rem 0; border-radius: .5rem; }
  .user { background: #e8f0fe; }
  .assistant { background: #f1f3f4; }
  .notice { color: #5f6368; font-size: .85rem; padding: 0 .75rem; }
  #chat-form { display: flex; gap: .5rem; }
  #message { flex: 1; min-height: 3rem; font: inherit; }
</style>
</head>
<body>
<h1>sllm chat</h1>
<div id="log"></div>
<form id="chat-form">
  <textarea id="message" name="message" placeholder="메시지를 입력하세요" required></textarea>
  <div>
    <button id="send" type="submit">Send</button>
    <button id="reset" type="button">Reset</button>
  </div>
</form>
<script>
const log = document.getElementById("log");
const form = document.getElementById("chat-form");
const input = document.getElementById("message");
let messages = [];

function show(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  log.appendChild(div);
  return div;
}

function ask() {
  return fetch("/v1/chat/completions", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({messages: messages, max_tokens: __MAX_TOKENS__, stream: true}),
  });
}

async function send(text) {
  messages.push({role: "user", content: text});
  show("user", text);
  const reply = show("assistant", "");
  let response = await ask();
  while (!response.ok) {
    const message = (await response.json()).error.message;
    if (!message.includes("more than the context") || messages.length < 3) {
      reply.textContent = "error: " + message;
      reply.classList.add("done");
      messages.pop();
      return;
    }
    messages.splice(0, 2);  // the oldest exchange, as `sllm chat` drops it
    log.insertBefore(show("notice", "(the oldest messages were dropped to fit the context)"), reply);
    response = await ask();
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\\n\\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const parsed = JSON.parse(data);
      const error = parsed.error && " (error: " + parsed.error.message + ")";
      reply.textContent += error || parsed.choices[0].delta.content || "";
    }
  }
  reply.classList.add("done");
  messages.push({role: "assistant", content: reply.textContent});
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  input.value = "";
  if (text) send(text);
});
document.getElementById("reset").addEventListener("click", () => { messages = []; log.replaceChildren(); });
</script>
</body>
</html>
"""


def chat_page(max_tokens_limit: int) -> str:
    """The page for a server that refuses requests over `max_tokens_limit` tokens."""
    return _PAGE.replace("__MAX_TOKENS__", str(min(REPLY_TOKENS, max_tokens_limit)))
