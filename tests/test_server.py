import contextlib
import http.client
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import uvicorn

from sllm.infer.chat_template import PLAIN
from sllm.infer.engine import TextGenerator
from sllm.infer.server import create_app
from sllm.infer.server_limits import ServerLimits

from .test_cli import assert_one_line_error, sllm


@pytest.fixture(scope="module")
def generator(trained_run):
    return TextGenerator.from_run(trained_run, device="cpu")


@contextlib.contextmanager
def serving(app):
    """`app` on a free loopback port, served from a thread; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server_url(generator):
    """The app with a max_tokens limit of 64, served for the module's tests."""
    with serving(create_app(generator, PLAIN, "tiny", ServerLimits(max_tokens_limit=64))) as url:
        yield url


def _post(url, body):
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _events(text):
    data = [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_completion_returns_the_engine_text_and_usage(server_url, generator):
    body = {"prompt": "대한민국은", "max_tokens": 12, "temperature": 0}
    status, text = _post(f"{server_url}/v1/completions", body)
    assert status == 200
    reply = json.loads(text)
    expected = generator.generate("대한민국은", max_new_tokens=12, temperature=0)
    assert reply["choices"][0]["text"] == expected
    assert reply["object"] == "text_completion"
    assert reply["usage"]["prompt_tokens"] == len(generator.tokenizer.encode("대한민국은"))


def test_a_list_of_prompts_is_answered_in_order(server_url, generator):
    prompts = ["대한민국은", "제1조"]
    status, text = _post(
        f"{server_url}/v1/completions", {"prompt": prompts, "max_tokens": 6, "temperature": 0}
    )
    assert status == 200
    choices = json.loads(text)["choices"]
    assert [c["text"] for c in choices] == [
        generator.generate(p, max_new_tokens=6, temperature=0) for p in prompts
    ]


def test_chat_completion_and_its_sse_stream_agree(server_url):
    body = {"messages": [{"role": "user", "content": "국민의 권리"}], "max_tokens": 10, "temperature": 0}
    status, text = _post(f"{server_url}/v1/chat/completions", body)
    assert status == 200
    reply = json.loads(text)
    assert reply["object"] == "chat.completion"
    content = reply["choices"][0]["message"]["content"]
    status, streamed = _post(f"{server_url}/v1/chat/completions", {**body, "stream": True})
    assert status == 200
    chunks = _events(streamed)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == content
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_completion_stream_matches_non_streaming(server_url):
    body = {"prompt": "헌법", "max_tokens": 10, "temperature": 0.9, "seed": 3}
    _, plain = _post(f"{server_url}/v1/completions", body)
    _, streamed = _post(f"{server_url}/v1/completions", {**body, "stream": True})
    assert (
        "".join(c["choices"][0]["text"] for c in _events(streamed)) == json.loads(plain)["choices"][0]["text"]
    )


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"prompt": "국민의 권리와 의무 " * 40}, "prompt", "more than the context"),
        ({"prompt": "a", "max_tokens": 65}, "max_tokens", "max_tokens must be at most 64"),
        ({"prompt": "a", "temperature": -1}, "temperature", "temperature must be in [0, 100], got -1"),
        ({"prompt": "a", "top_p": 0}, "top_p", "top_p must be in (0, 1]"),
        ({"prompt": "a", "stop": [""]}, "stop", "stop must be at most 8 non-empty strings"),
        ({"max_tokens": 3}, "prompt", "prompt: Field required"),
        ({"prompt": ["a"] * 65}, "prompt", "at most 64 prompts"),
        ({"prompt": ["a"] * 22, "n": 3}, "n", "counting n choices each, got 66"),
        ({"prompt": "a", "n": 0}, "n", "n: Input should be greater than or equal to 1"),
        ({"prompt": "a", "logprobs": 2}, "logprobs", "not supported by this server: logprobs"),
        ({"prompt": "a", "logit_bias": {"5": 10}, "best_of": 2}, "logit_bias", "logit_bias, best_of"),
        ({"prompt": "a", "logprobs": 0}, "logprobs", "not supported by this server: logprobs"),
    ],
)
def test_bad_requests_get_400_json_errors(server_url, body, param, fragment):
    got, text = _post(f"{server_url}/v1/completions", body)
    error = json.loads(text)["error"]
    assert got == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and fragment in error["message"]


def test_openai_client_habits_are_honoured(server_url, generator):
    """Nulls mean defaults, do-nothing values of unsupported options pass, `echo` repeats the
    prompt, `max_completion_tokens` limits a chat reply."""
    body = {"prompt": "대한민국은", "max_tokens": 5, "temperature": 0, "top_p": None, "seed": None,
            "logprobs": None, "best_of": 1, "user": "someone", "echo": True}  # fmt: skip
    status, text = _post(f"{server_url}/v1/completions", body)
    assert status == 200, text
    expected = generator.generate("대한민국은", max_new_tokens=5, temperature=0)
    assert json.loads(text)["choices"][0]["text"] == "대한민국은" + expected
    _, streamed = _post(f"{server_url}/v1/completions", {**body, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in _events(streamed)) == "대한민국은" + expected
    status, text = _post(f"{server_url}/v1/completions", {"prompt": "헌법", "max_completion_tokens": 3})
    assert status == 200 and json.loads(text)["usage"]["completion_tokens"] <= 3

    chat = {"messages": [{"role": "user", "content": "국민"}], "temperature": 0, "max_tokens": None}
    status, text = _post(f"{server_url}/v1/chat/completions", {**chat, "max_completion_tokens": 3})
    assert status == 200, text
    assert json.loads(text)["usage"]["completion_tokens"] <= 3


def test_n_choices_per_prompt_in_openai_order(server_url, generator):
    body = {"prompt": ["대한민국은", "제1조"], "n": 3, "max_tokens": 6, "temperature": 0}
    status, text = _post(f"{server_url}/v1/completions", body)
    assert status == 200
    reply = json.loads(text)
    greedy = [generator.generate(p, max_new_tokens=6, temperature=0) for p in body["prompt"]]
    assert [c["index"] for c in reply["choices"]] == list(range(6))
    assert [c["text"] for c in reply["choices"]] == [greedy[0]] * 3 + [greedy[1]] * 3
    prompt_tokens = sum(len(generator.tokenizer.encode(p)) for p in body["prompt"])
    assert reply["usage"]["prompt_tokens"] == prompt_tokens  # each prompt counted once

    sampled = {"messages": [{"role": "user", "content": "국민"}], "n": 4, "max_tokens": 8, "seed": 1}
    status, text = _post(f"{server_url}/v1/chat/completions", sampled)
    choices = json.loads(text)["choices"]
    assert status == 200 and [c["index"] for c in choices] == [0, 1, 2, 3]
    assert len({c["message"]["content"] for c in choices}) > 1  # sampled independently


def test_stream_options_include_usage_adds_a_usage_chunk(server_url):
    body = {"messages": [{"role": "user", "content": "국민"}], "max_tokens": 4, "stream": True}
    _, streamed = _post(
        f"{server_url}/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}
    )
    *pieces, last = _events(streamed)
    assert last["choices"] == [] and 1 <= last["usage"]["completion_tokens"] <= 4
    assert last["usage"]["prompt_tokens"] > 0 and pieces[-1]["choices"][0]["finish_reason"]
    _, plain = _post(f"{server_url}/v1/chat/completions", body)
    assert all("usage" not in c for c in _events(plain))


@pytest.mark.parametrize(
    ("body", "headers"),
    [(b"prompt=a", {}), (b"prompt=a", {"Content-Type": "application/json"}),
     (b'{"prompt": "a",}', {"Content-Type": "application/json"})],
)  # fmt: skip
def test_a_body_that_is_not_json_is_one_clear_error(server_url, body, headers):
    request = urllib.request.Request(f"{server_url}/v1/completions", body, headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=30)
    assert error.value.code == 400
    assert "Content-Type: application/json" in json.loads(error.value.read())["error"]["message"]


def test_do_nothing_values_of_unsupported_options_pass_and_limits_name_the_field_sent(server_url):
    chat = {"messages": [{"role": "user", "content": "국민"}], "max_tokens": 2}
    status, _ = _post(f"{server_url}/v1/chat/completions", {**chat, "tool_choice": "none", "tools": []})
    assert status == 200
    status, text = _post(f"{server_url}/v1/chat/completions", {**chat, "max_completion_tokens": 65})
    assert status == 400 and "max_completion_tokens must be at most 64" in text


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_cancels_its_generation(generator, monkeypatch, stream):
    """Hanging up frees the model for the next request at once: the generation stops (its rows
    finish as cancelled) instead of running to max_tokens."""
    started, streams = threading.Event(), []
    stream_ids = generator.stream_ids

    def recorded(*args, **kwargs):
        streams.append(stream_ids(*args, **kwargs))
        streams[-1].tokens.eos_id = None  # no row ends early: only hanging up can stop them
        started.set()
        return streams[-1]

    monkeypatch.setattr(generator, "stream_ids", recorded)
    new_tokens = 4000
    with serving(create_app(generator, PLAIN, "tiny", ServerLimits(max_tokens_limit=new_tokens))) as url:
        host, port = url.removeprefix("http://").split(":")
        client = http.client.HTTPConnection(host, int(port), timeout=30)
        body = {"prompt": ["헌법"] * 8, "max_tokens": new_tokens, "temperature": 1, "stream": stream}
        client.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        if stream:
            client.getresponse().readline()  # the first event: generation is under way
        assert started.wait(30)
        time.sleep(0.3)
        client.close()
        status, _ = _post(f"{url}/v1/completions", {"prompt": "헌법", "max_tokens": 2})
    assert status == 200
    first = streams[0]
    assert first.tokens.finish_reasons == ["cancelled"] * 8
    assert max(len(text.ids) for text in first.texts) < new_tokens


def test_bad_chat_role_is_rejected(server_url):
    got, text = _post(f"{server_url}/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
    assert got == 400 and "role" in json.loads(text)["error"]["message"]


def test_eight_concurrent_requests_are_all_answered(server_url, generator):
    prompts = ["대한민국은", "제1조", "국민", "헌법", "법률", "대통령", "국회", "모든 국민은"]

    def ask(prompt):
        return _post(f"{server_url}/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, prompts))
    assert [status for status, _ in answers] == [200] * 8
    texts = [json.loads(text)["choices"][0]["text"] for _, text in answers]
    assert texts == [generator.generate(p, max_new_tokens=8, temperature=0) for p in prompts]
    with urllib.request.urlopen(f"{server_url}/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_the_page_has_the_chat_form(server_url):
    with urllib.request.urlopen(f"{server_url}/", timeout=10) as response:
        page = response.read().decode()
    assert '<form id="chat-form">' in page and 'id="message"' in page and "/v1/chat/completions" in page
    assert "max_tokens: 64," in page  # the fixture server's limit, below the page's usual 200


def _chromium() -> tuple[str, str] | None:
    """Paths of the Chromium browser and its driver, or None when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _message_of_half_the_context(generator) -> str:
    """A message that fits the context alone but not twice: a second one overflows it."""
    text, half = "국민", generator.context_tokens // 2 + 1
    while len(generator.tokenizer.encode(text + " 국민")) <= half:
        text += " 국민"
    return text


@pytest.mark.skipif(
    _chromium() is None,
    reason="headless browser test needs Chromium and its driver (Debian: chromium chromium-driver)",
)
def test_a_real_browser_sends_a_message_and_sees_the_streamed_reply(server_url, generator, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="browser test needs selenium")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, chromedriver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
                 f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    # The system driver, named explicitly: otherwise Selenium Manager tries to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        driver.get(server_url + "/")
        driver.find_element(By.ID, "message").send_keys("대한민국은")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant.done"))
        reply = driver.find_element(By.CSS_SELECTOR, ".assistant.done").text
        long = _message_of_half_the_context(generator)
        for _ in range(2):  # the second exchange no longer fits after the first: the page drops it
            # Counted before the click: a short reply can be done before a count taken after it.
            done = len(driver.find_elements(By.CSS_SELECTOR, ".assistant.done"))
            driver.find_element(By.ID, "message").send_keys(long)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 60).until(
                lambda d, done=done: len(d.find_elements(By.CSS_SELECTOR, ".assistant.done")) > done
            )
        replies = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".assistant.done")]
        notices = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".notice")]
        driver.save_screenshot(str(tmp_path / "chat.png"))
    finally:
        driver.quit()
    assert reply and not reply.startswith("error")
    assert not any(r.startswith("error") for r in replies), replies
    assert notices and all("oldest messages were dropped" in n for n in notices)
    screenshot = (tmp_path / "chat.png").read_bytes()
    assert screenshot.startswith(b"\x89PNG\r\n\x1a\n") and len(screenshot) > 1000


def test_serving_on_a_taken_port_is_one_line_before_the_model_loads(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = sllm("serve", "--run", tmp_path / "no-run-needed", "--port", str(port))
    finally:
        taken.close()
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "choose another --port")


def test_sampling_defaults_are_the_same_in_config_cli_api_and_server(trained_run, generator):
    """`SamplingParams` declares the defaults once: the config's `sample` section holds them, the
    CLI and the server fill what a user leaves out with the run's section, and the Python API
    with the declaration itself, so all four draw the same text."""
    from sllm.cli import build_parser
    from sllm.commands import sampling_params
    from sllm.config import Config
    from sllm.infer.server import build_app
    from sllm.sampling import RUN_OPTIONS, SamplingParams

    declared = SamplingParams()
    assert (declared.temperature, declared.top_k, declared.top_p, declared.seed) == (0.8, 50, 0.95, None)
    assert all(getattr(Config().sample, name) == getattr(declared, name) for name in RUN_OPTIONS)
    for command, length in (["generate", "--prompt", "x"], 100), (["chat"], 200):
        cli = sampling_params(build_parser().parse_args([*command, "--run", str(trained_run)]))
        assert cli == SamplingParams(max_new_tokens=length)

    explicit = {name: getattr(declared, name) for name in RUN_OPTIONS if name != "max_new_tokens"}
    api = generator.generate("대한민국은", max_new_tokens=8, seed=3)
    assert api == generator.generate("대한민국은", max_new_tokens=8, seed=3, **explicit)
    with serving(build_app(trained_run, device="cpu")) as url:
        status, text = _post(f"{url}/v1/completions", {"prompt": "대한민국은", "max_tokens": 8, "seed": 3})
    assert status == 200 and json.loads(text)["choices"][0]["text"] == api


def test_the_server_samples_as_the_runs_sample_section_says(tmp_path, tokenizer):
    from sllm.infer.server import build_app

    from .conftest import random_run

    run = random_run(tmp_path / "run", tokenizer, "sample.temperature=0")
    greedy = TextGenerator.from_run(run, device="cpu").generate("국민", max_new_tokens=6, temperature=0)
    with serving(build_app(run, device="cpu")) as url:
        status, text = _post(f"{url}/v1/completions", {"prompt": "국민", "max_tokens": 6})
    assert status == 200 and json.loads(text)["choices"][0]["text"] == greedy
