"""The single-page web chat `sllm serve` shows at `/`: `chat.html` beside this module.

One file with no external assets, so it works offline. The page keeps the conversation in the
browser, streams replies from `/v1/chat/completions`, drops the oldest exchanges with a notice
when the context is full (as `sllm chat` does), asks for at most `REPLY_TOKENS` (or the
server's lower `--max-tokens-limit`) and sets no sampling option (the run's `sample` applies).
"""

from importlib.resources import files

REPLY_TOKENS = 200


def chat_page(max_tokens_limit: int) -> str:
    """The page for a server that refuses requests over `max_tokens_limit` tokens."""
    page = files("sllm.infer").joinpath("chat.html").read_text(encoding="utf-8")
    return page.replace("__MAX_TOKENS__", str(min(REPLY_TOKENS, max_tokens_limit)))
