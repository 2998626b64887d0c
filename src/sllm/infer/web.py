"""The single-page web chat `sllm serve` shows at `/`: `chat.html` beside this module.

HTML, CSS and JavaScript in one file: no build step and no external assets, so it works on a
machine without internet. The page keeps the conversation in the browser, sends it to
`/v1/chat/completions` with `stream: true`, and appends each Server-Sent Event's text (or
error) to the reply as it arrives. When the conversation outgrows the context, the oldest
exchanges are dropped with a notice, as `sllm chat` does. Replies ask for at most
`REPLY_TOKENS`, or the server's `--max-tokens-limit` when that is lower, so the page never
sends a request its own server refuses. It sets no sampling option, so the replies follow
the run's `sample` section, as in `sllm chat`.
"""

from importlib.resources import files

REPLY_TOKENS = 200


def chat_page(max_tokens_limit: int) -> str:
    """The page for a server that refuses requests over `max_tokens_limit` tokens."""
    page = files("sllm.infer").joinpath("chat.html").read_text(encoding="utf-8")
    return page.replace("__MAX_TOKENS__", str(min(REPLY_TOKENS, max_tokens_limit)))
