"""A model that ends its text at once: `min_new_tokens` holds back EOS and one-token stop
strings for that many tokens (generate, chat, the Python API, the server's `min_tokens`),
and `generate` and `chat` say why a reply is empty instead of printing nothing."""

import dataclasses
import io
import json

import pytest
import torch

from sllm.cli import main
from sllm.infer.chat import ChatSession
from sllm.infer.chat_template import PLAIN
from sllm.infer.engine import TextGenerator
from sllm.infer.logits import BannedTokens
from sllm.model.gpt import GPT
from sllm.sampling import SamplingParams

NOTE = "note: the model ended its text at once (end-of-text first); "


@pytest.fixture
def insistent(monkeypatch):
    """Make every GPT rate one token (default: EOS) far above all others; returns the setter."""
    original = GPT.logits

    def insist_on(token: int) -> None:
        def logits(model, hidden):
            return original(model, hidden).index_fill(-1, torch.tensor([token]), 1e4)

        monkeypatch.setattr(GPT, "logits", logits)

    return insist_on


def test_banned_tokens_hold_back_ending_ids_until_min_new_tokens():
    banned = BannedTokens(never=(1,), ending=(3,), min_new_tokens=2, device=torch.device("cpu"))
    logits = torch.zeros(2, 5)
    for step, expected in [(0, {1, 3}), (1, {1, 3}), (2, {1}), (9, {1})]:
        assert set(torch.isinf(banned(logits, step)[0]).nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("min_new_tokens", [0, 1, 5])
def test_min_new_tokens_outlasts_a_model_that_ends_at_once(trained_run, insistent, min_new_tokens):
    generator = TextGenerator.from_run(trained_run, device="cpu")
    insistent(generator.tokenizer.eos_id)
    params = SamplingParams(max_new_tokens=10, min_new_tokens=min_new_tokens, temperature=0.8, seed=1)
    (completion,) = generator.complete(["대한민국은"], params)
    assert (completion.completion_tokens, completion.finish_reason) == (min_new_tokens, "stop")
    assert bool(completion.text) == (min_new_tokens > 0)
    longer = dataclasses.replace(params, max_new_tokens=3, min_new_tokens=7)  # held up to max_new_tokens
    (held,) = generator.complete(["대한민국은"], longer)
    assert (held.completion_tokens, held.finish_reason) == (3, "length") and held.text


def test_a_one_token_stop_string_is_held_back_like_eos(trained_run, insistent):
    generator = TextGenerator.from_run(trained_run, device="cpu")
    end = generator.tokenizer.encode("다")
    assert len(end) == 1  # one token of this tokenizer
    insistent(end[0])
    plain = SamplingParams(max_new_tokens=10, temperature=0, stop=("다",))
    assert generator.complete(["헌법"], plain)[0].text == ""
    (held,) = generator.complete(["헌법"], dataclasses.replace(plain, min_new_tokens=4))
    assert held.text and held.finish_reason == "stop" and held.completion_tokens == 5  # 4 held, then the stop


def test_generate_says_when_the_model_ended_at_once(trained_run, insistent, capsys):
    insistent(TextGenerator.from_run(trained_run, device="cpu").tokenizer.eos_id)
    main(["generate", "--run", str(trained_run), "--prompt", "대한민국은", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert out == "대한민국은\n"
    assert err == NOTE + "--min-new-tokens N makes it write N tokens first\n"
    main(["generate", "--run", str(trained_run), "--prompt", "대한민국은", "--min-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert len(out) > len("대한민국은\n") and err == ""


def test_chat_says_when_the_reply_is_empty_and_set_fixes_it(trained_run, insistent, capsys):
    generator = TextGenerator.from_run(trained_run, device="cpu")
    insistent(generator.tokenizer.eos_id)
    out = io.StringIO()
    session = ChatSession(generator, PLAIN, SamplingParams(max_new_tokens=8, temperature=0), out)
    session.handle("대한민국은")
    assert out.getvalue() == "\n"
    assert (
        capsys.readouterr().err
        == NOTE + "/set min_new_tokens N (or --min-new-tokens N) makes it write N tokens first\n"
    )
    session.handle("/set min_new_tokens 4")
    session.handle("대한민국은")
    assert out.getvalue().splitlines()[-1] and capsys.readouterr().err == ""
    assert len(generator.tokenizer.encode(session.messages[-1].content)) >= 3  # 4 tokens, re-encoded


def test_the_server_takes_min_tokens(trained_run, insistent):
    pytest.importorskip("fastapi")
    from sllm.infer.server import build_app

    from .test_server import _post, serving

    insistent(TextGenerator.from_run(trained_run, device="cpu").tokenizer.eos_id)
    with serving(build_app(trained_run, device="cpu")) as url:
        answers = [
            _post(f"{url}/v1/completions", {"prompt": "대한민국은", "max_tokens": 8, **extra})
            for extra in ({}, {"min_tokens": 5}, {"min_tokens": -1})
        ]
    usage = [json.loads(text).get("usage", {}).get("completion_tokens") for _, text in answers]
    assert [status for status, _ in answers] == [200, 200, 400] and usage[:2] == [0, 5]
    error = json.loads(answers[2][1])["error"]
    assert (error["param"], error["message"]) == ("min_tokens", "min_tokens must not be negative, got -1")
