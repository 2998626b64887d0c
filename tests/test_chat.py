import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sllm.errors import UserError
from sllm.infer.chat import ChatSession, parse_setting
from sllm.infer.chat_template import PLAIN, ChatTemplate, Message, load_chat_template
from sllm.infer.engine import TextGenerator
from sllm.sampling import SamplingParams

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def generator(trained_run):
    return TextGenerator.from_run(trained_run, device="cpu")


def test_chat_through_a_stdin_pipe_replies_resets_sets_and_exits(trained_run, generator):
    expected = generator.generate("대한민국은", max_new_tokens=8, temperature=0)
    lines = "대한민국은\n/set temperature 0.7\n/set colour red\n/reset\n/exit\nnever read\n"
    result = subprocess.run(
        [sys.executable, "-m", "sllm", "chat", "--run", str(trained_run), "--device", "cpu",
         "--temperature", "0", "--max-new-tokens", "8", "--repetition-penalty", "1", "--top-k", "0"],
        input=lines, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": SRC},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split("> ")
    assert replies[1] == expected + "\n"
    assert replies[2] == "(temperature = 0.7)\n"
    assert replies[3].startswith("error: usage: /set NAME VALUE")
    assert replies[4] == "(conversation cleared)\n"
    assert len(replies) == 6


def test_oldest_turns_are_dropped_with_a_notice_and_reset_forgets(generator):
    out = io.StringIO()
    params = SamplingParams(max_new_tokens=4, temperature=0)
    session = ChatSession(generator, PLAIN, params, out)
    for _ in range(4):
        session.handle("국민의 권리와 의무를 정한다")  # ~ a third of the 32-token context
    assert "oldest messages to fit the context" in out.getvalue()
    prompt = generator.tokenizer.encode(PLAIN.render(session.messages[:-1]))
    assert len(prompt) <= generator.context_tokens - 4
    assert session.messages[-2] == Message("user", "국민의 권리와 의무를 정한다")
    session.handle("/reset")
    assert session.messages == []


def test_set_parses_values_and_rejects_bad_ones():
    params = parse_setting(SamplingParams(), "temperature 0.7")
    assert params.temperature == 0.7
    with pytest.raises(UserError):
        parse_setting(params, "top_p 2")
    with pytest.raises(UserError):
        parse_setting(params, "top_k many")


def test_a_run_can_ship_its_chat_template(tmp_path):
    assert load_chat_template(tmp_path) == PLAIN
    fields = {"user": "<u>{text}</u>", "assistant": "<a>{text}</a>", "reply_prefix": "<a>", "stop": ["</a>"]}
    (tmp_path / "chat_template.json").write_text(json.dumps(fields))
    template = load_chat_template(tmp_path)
    assert template == ChatTemplate(
        user="<u>{text}</u>", assistant="<a>{text}</a>", reply_prefix="<a>", stop=("</a>",)
    )
    messages = [Message("user", "hi"), Message("assistant", "hello"), Message("user", "bye")]
    assert template.render(messages) == "<u>hi</u><a>hello</a><u>bye</u><a>"
