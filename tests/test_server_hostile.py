"""`sllm serve` under hostile requests: sizes checked before anything is allocated, a capped
body, CPU work off the event loop, a bounded queue, numerically safe sampling, OpenAI's error
body (checked with the real `openai` client) and no broken UTF-8 in any text."""

import http.client
import itertools
import json
import threading
import time
import tracemalloc
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")

from sllm.cli import build_parser, main
from sllm.commands import serve_limits
from sllm.infer.chat_template import PLAIN
from sllm.infer.engine import TextGenerator, TextRow
from sllm.infer.logits import TokenHistory, sample_next
from sllm.infer.server import create_app
from sllm.infer.server_limits import ServerLimits
from sllm.sampling import SamplingParams

from .test_server import _events, _post, generator, serving  # noqa: F401 (a fixture)

SMALL = ServerLimits(max_tokens_limit=64, max_body_bytes=1000, max_queue=1)


@pytest.fixture(scope="module")
def url(generator):  # noqa: F811
    with serving(create_app(generator, PLAIN, "tiny", SMALL)) as served:
        yield served


def _health_answers(url, timeout_s):
    with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
        return json.loads(response.read())


def test_a_huge_n_is_refused_before_anything_is_allocated(url):
    tracemalloc.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            asked = [
                pool.submit(_post, f"{url}/v1/completions", {"prompt": "a", "n": 10**7}) for _ in range(4)
            ]
            assert _health_answers(url, 2)["status"] == "ok"
            answers = [future.result(timeout=5) for future in asked]
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for status, text in answers:
        assert status == 400
        error = json.loads(text)["error"]
        assert error["param"] == "n" and "at most 64 prompts" in error["message"]
    assert peak_bytes < 20 * 2**20  # a list of 10**7 rows alone would take 80 MB


def test_tokenizing_runs_off_the_event_loop(url, generator, monkeypatch):  # noqa: F811
    """A prompt that takes long to tokenize (here: made slow) does not stall /health."""
    encode, entered = generator.encode_prompt, threading.Event()

    def slow_encode(*args, **kwargs):
        entered.set()
        time.sleep(1.5)
        return encode(*args, **kwargs)

    monkeypatch.setattr(generator, "encode_prompt", slow_encode)
    with ThreadPoolExecutor(1) as pool:
        asked = pool.submit(_post, f"{url}/v1/completions", {"prompt": "헌법", "max_tokens": 2})
        assert entered.wait(10)
        started = time.monotonic()
        assert _health_answers(url, 1)["status"] == "ok"
        assert time.monotonic() - started < 1
        assert asked.result(timeout=30)[0] == 200


def test_a_body_over_the_limit_is_413_before_it_is_read(url):
    host, port = url.removeprefix("http://").split(":")
    json_type = {"Content-Type": "application/json"}
    claims_too_much = http.client.HTTPConnection(host, int(port), timeout=5)
    claims_too_much.putrequest("POST", "/v1/completions")
    for name, value in {**json_type, "Content-Length": "10000000"}.items():
        claims_too_much.putheader(name, value)
    claims_too_much.endheaders(b'{"prompt": "')  # the rest is never sent: the answer must not wait for it
    response = claims_too_much.getresponse()
    assert response.status == 413
    assert "larger than 1,000 bytes" in json.loads(response.read())["error"]["message"]

    body = json.dumps({"prompt": "가" * 600}).encode()  # over 1,000 bytes, sent without a length
    chunked = http.client.HTTPConnection(host, int(port), timeout=5)
    chunked.request("POST", "/v1/completions", iter([body[:500], body[500:]]), json_type, encode_chunked=True)
    response = chunked.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["type"] == "invalid_request_error"
    status, text = _post(f"{url}/v1/completions", {"prompt": "가" * 100})  # 600 bytes: read and parsed
    assert status == 400 and json.loads(text)["error"]["code"] == "context_length_exceeded"


class HeldStream:
    """A generation that waits for `release` before its first step."""

    def __init__(self, stream, release):
        self.stream, self.release = stream, release

    def __iter__(self):
        assert self.release.wait(30)
        yield from self.stream

    def __getattr__(self, name):
        return getattr(self.stream, name)


def test_a_full_queue_is_429_with_retry_after(url, generator, monkeypatch):  # noqa: F811
    stream_ids, release, started = generator.stream_ids, threading.Event(), threading.Event()

    def held(*args, **kwargs):
        started.set()
        return HeldStream(stream_ids(*args, **kwargs), release)

    monkeypatch.setattr(generator, "stream_ids", held)
    body = {"prompt": "헌법", "max_tokens": 2}
    with ThreadPoolExecutor(2) as pool:
        try:
            running = pool.submit(_post, f"{url}/v1/completions", body)
            assert started.wait(10)
            waiting = pool.submit(_post, f"{url}/v1/completions", body)
            deadline = time.monotonic() + 10
            while _health_answers(url, 5)["waiting"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            for stream in (False, True):
                request = urllib.request.Request(
                    f"{url}/v1/completions", json.dumps({**body, "stream": stream}).encode(),
                    {"Content-Type": "application/json"}, method="POST",
                )  # fmt: skip
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(request, timeout=5)
                assert refused.value.code == 429 and refused.value.headers["Retry-After"] == "1"
                error = json.loads(refused.value.read())["error"]
                assert error["code"] == "rate_limit_exceeded" and "--max-queue 1" in error["message"]
        finally:
            release.set()
        assert [running.result(30)[0], waiting.result(30)[0]] == [200, 200]


@pytest.mark.parametrize("stream", [False, True])
def test_tiny_temperature_is_greedy_and_extreme_penalties_are_refused(url, generator, stream):  # noqa: F811
    greedy = generator.generate("대한민국은", max_new_tokens=8, temperature=0)
    body = {"prompt": "대한민국은", "max_tokens": 8, "temperature": 1e-40, "top_p": 1e-300, "stream": stream}
    status, text = _post(f"{url}/v1/completions", body)
    assert status == 200
    if stream:
        assert "".join(c["choices"][0]["text"] for c in _events(text)) == greedy
    else:
        assert json.loads(text)["choices"][0]["text"] == greedy
    status, text = _post(f"{url}/v1/completions", {**body, "repetition_penalty": 1e-30})
    error = json.loads(text)["error"]
    assert status == 400 and error["param"] == "repetition_penalty" and "[0.01, 100]" in error["message"]


def test_sampling_is_safe_for_every_extreme_that_validation_accepts():
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 30
    logits[:, :8] = float("-inf")  # tokens never generated
    extremes = itertools.product(
        [0, 1e-300, 1e-5, 100], [0.01, 1, 100], [1e-300, 1], [0, 0.99999999], [-2, 2]
    )
    for temperature, repetition, top_p, min_p, penalty in extremes:
        params = SamplingParams(
            temperature=temperature, repetition_penalty=repetition, top_p=top_p, min_p=min_p,
            presence_penalty=penalty, frequency_penalty=penalty, top_k=0,
        )  # fmt: skip
        history = TokenHistory([list(range(64)), [9]], 64, torch.device("cpu"))
        history.add(torch.tensor([20, 30]))
        tokens = sample_next(logits, params, history)
        assert ((tokens >= 8) & (tokens < 64)).all(), params


def test_generate_cli_takes_a_tiny_temperature_and_refuses_a_tiny_penalty(trained_run, capsys):
    base = [
        "generate",
        "--run",
        str(trained_run),
        "--prompt",
        "국민",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
    ]
    main([*base, "--temperature", "0"])
    greedy = capsys.readouterr().out
    main([*base, "--temperature", "1e-40"])
    assert capsys.readouterr().out == greedy
    with pytest.raises(SystemExit) as exit:
        main([*base, "--repetition-penalty", "1e-30"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "sllm: error: repetition_penalty must be in [0.01, 100], got 1e-30"
    ]


def test_a_failure_inside_a_stream_is_an_error_event_then_done(url, generator, monkeypatch):  # noqa: F811
    stream_ids = generator.stream_ids

    class Failing(HeldStream):
        def __iter__(self):
            yield from itertools.islice(self.stream, 1)
            raise RuntimeError("the model fell over")

    monkeypatch.setattr(generator, "stream_ids", lambda *a, **k: Failing(stream_ids(*a, **k), None))
    body = {"prompt": "대한민국은", "max_tokens": 8, "temperature": 0, "stream": True}
    status, text = _post(f"{url}/v1/completions", body)
    assert status == 200
    *pieces, failure = _events(text)  # _events checks that [DONE] ends the stream
    assert pieces and all(p["choices"][0]["text"] for p in pieces)
    assert failure["error"]["type"] == "server_error" and "the model fell over" in failure["error"]["message"]
    status, text = _post(f"{url}/v1/completions", {**body, "stream": False})
    assert status == 500 and "the model fell over" in json.loads(text)["error"]["message"]


def test_the_openai_client_lists_the_model_completes_and_raises_its_errors(generator):  # noqa: F811
    openai = pytest.importorskip("openai")
    with serving(create_app(generator, PLAIN, "tiny")) as served:
        client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=30)
        assert [model.id for model in client.models.list()] == ["tiny"]
        reply = client.completions.create(model="tiny", prompt="대한민국은", max_tokens=6, temperature=0)
        assert reply.choices[0].text == generator.generate("대한민국은", max_new_tokens=6, temperature=0)
        chat = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "국민"}],
            "max_tokens": 6,
            "seed": 1,
        }
        whole = client.chat.completions.create(**chat).choices[0].message.content
        streamed = client.chat.completions.create(**chat, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole

        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="tiny", prompt="a", temperature=-1)
        assert refused.value.param == "temperature" and refused.value.type == "invalid_request_error"
        assert set(refused.value.body) == {"message", "type", "param", "code"}
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="tiny", prompt="a", logit_bias={"5": 10})
        assert refused.value.code == "unsupported_parameter" and refused.value.param == "logit_bias"
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                **{**chat, "messages": [{"role": "user", "content": "국민 " * 99}]}
            )
        assert refused.value.code == "context_length_exceeded" and refused.value.param == "messages"
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="tiny", prompt="a" * 1_100_000)
        assert refused.value.status_code == 413


def _byte_tokens(tokenizer, data: bytes) -> list[int]:
    """The ids of the byte-level tokens of `data`, one byte each."""
    from sllm.fast_bpe import _unicode_to_byte

    char_of = {byte: char for char, byte in _unicode_to_byte().items()}
    return [tokenizer.token_id(char_of[byte]) for byte in data]


def test_text_never_holds_a_broken_character(tokenizer):
    """Bytes of a character the model broke off (the start of 나 before "A") or left unfinished
    at the end are dropped; a character split over tokens appears whole, once complete."""
    data = "가".encode() + "나".encode()[:1] + b"A" + "나".encode() + "다".encode()[:2]
    row, pieces = TextRow(tokenizer), []
    for token in _byte_tokens(tokenizer, data):
        pieces.append(row.add(token))
    pieces.append(row.finish())
    assert "".join(pieces) == row.text == data.decode("utf-8", "ignore") == "가A나"
    assert [p for p in pieces if p] == ["가", "A", "나"]


def test_no_completion_or_stream_holds_u_fffd(tmp_path, tokenizer):
    """A random model draws lone bytes often; the text keeps only whole characters, and the
    stream and the plain answer agree."""
    from .conftest import random_run

    model = TextGenerator.from_run(random_run(tmp_path / "run", tokenizer), device="cpu")
    with serving(create_app(model, PLAIN, "random")) as served:
        for seed in range(4):
            body = {"prompt": "국민", "max_tokens": 8, "temperature": 1, "top_k": 0, "top_p": 1, "seed": seed}
            _, plain = _post(f"{served}/v1/completions", body)
            _, streamed = _post(f"{served}/v1/completions", {**body, "stream": True})
            text = json.loads(plain)["choices"][0]["text"]
            assert "\ufffd" not in text
            assert "".join(c["choices"][0]["text"] for c in _events(streamed)) == text


def test_serve_help_states_the_limits_and_a_bad_one_is_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help = " ".join(capsys.readouterr().out.split())
    assert (
        "--max-queue N most generations waiting for the model; more: 429 with Retry-After (default: 32;"
        in help
    )
    assert "--max-body-bytes N largest request body; more: 413" in help and "--max-batch N" in help
    args = build_parser().parse_args(["serve", "--run", "x", "--max-queue", "3"])
    assert serve_limits(args) == ServerLimits(max_queue=3)  # the others at their defaults
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--run", "no/run", "--max-body-bytes", "0"])
    assert exit.value.code == 2
    assert capsys.readouterr().err == "sllm: error: max_body_bytes must be >= 1, got 0\n"
