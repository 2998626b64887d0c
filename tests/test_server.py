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

from sllm.infer.chat import PLAIN
from sllm.infer.engine import TextGenerator
from sllm.infer.server import create_app

from .test_cli import assert_one_line_error, sllm


@pytest.fixture(scope="module")
def generator(trained_run):
    return TextGenerator.from_run(trained_run, device="cpu")


@pytest.fixture(scope="module")
def server_url(generator):
    """The app on a free loopback port, served from a thread, stopped after the tests."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(generator, PLAIN, "tiny", 64), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


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
    ("body", "status", "fragment"),
    [
        ({"prompt": "국민의 권리와 의무 " * 40}, 400, "more than the context"),
        ({"prompt": "a", "max_tokens": 65}, 400, "max_tokens must be at most 64"),
        ({"prompt": "a", "temperature": -1}, 422, "temperature"),
        ({"prompt": "a", "top_p": 0}, 422, "top_p"),
        ({"prompt": "a", "stop": [""]}, 400, "stop"),
        ({"max_tokens": 3}, 422, "prompt"),
        ({"prompt": ["a"] * 65}, 400, "at most 64 prompts"),
    ],
)
def test_bad_requests_get_4xx_json_errors(server_url, body, status, fragment):
    got, text = _post(f"{server_url}/v1/completions", body)
    assert got == status
    assert fragment in json.loads(text)["error"]["message"]


def test_bad_chat_role_is_rejected(server_url):
    got, text = _post(f"{server_url}/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
    assert got == 422 and "role" in json.loads(text)["error"]["message"]


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


@pytest.mark.skipif(
    _chromium() is None,
    reason="headless browser test needs Chromium and its driver (Debian: chromium chromium-driver)",
)
def test_a_real_browser_sends_a_message_and_sees_the_streamed_reply(server_url, tmp_path):
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
        driver.save_screenshot(str(tmp_path / "chat.png"))
    finally:
        driver.quit()
    assert reply and not reply.startswith("error")
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
