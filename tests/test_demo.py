"""`hlwq demo` in a real headless browser: the app runs as a subprocess on a free loopback port (stopped by pid) and
Debian's Chromium drives it through Selenium and Debian's chromedriver (same version, shipped together; nothing is
downloaded). The page loads, a prompt with the bundled test image gets a streamed answer, bad inputs get a readable
line in the page, and the page only ever talks to 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
TEST_IMAGE = ROOT / "pipeline" / "assets" / "test_image.png"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1000"]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="Debian's chromium and chromium-driver are not installed (.ci/install-chromium.sh installs them)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listeners(port: int) -> list[str]:
    """Local addresses listening on `port` (hex, as /proc/net/tcp{,6} write them)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                out.append(local.rsplit(":", 1)[0])
    return out


@contextmanager
def demo_server(artifact: Path, tmp: Path) -> Iterator[str]:
    """`hlwq demo ARTIFACT --port P` in a subprocess; yields its URL once it answers; terminated by pid."""
    port = _free_port()
    log = tmp / "demo.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "demo", str(artifact), "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"demo exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"demo did not answer on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="hlwq-chromium-")
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes, checked below
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def huge_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "huge.png"
    Image.new("RGB", (8000, 7000), (20, 160, 40)).save(path)  # 56 megapixels, ~200 kB on disk
    return path


def _wait(browser: Any, cond: Any, timeout: float = 120, what: str = "") -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(cond, message=what)


def _text(browser: Any, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return "\n".join(e.text for e in browser.find_elements(By.CSS_SELECTOR, selector))


def _send(browser: Any, text: str, image: Path | None = None) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if image is not None:
        browser.find_element(By.CSS_SELECTOR, "#prompt input[type=file]").send_keys(str(image))
        _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#prompt img"), 30, "the image preview")
    box = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _settled(browser: Any, selector: str, timeout: float = 30) -> str:
    """The last element's text once it has stopped changing for half a second."""
    from selenium.webdriver.common.by import By

    last, since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = browser.find_elements(By.CSS_SELECTOR, selector)[-1].text
        if t != last:
            last, since = t, time.monotonic()
        elif time.monotonic() - since > 0.5:
            return str(t)
        time.sleep(0.05)
    raise AssertionError(f"{selector} kept changing for {timeout} s")


def _page_hosts(browser: Any) -> set[str]:
    hosts = set()
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            url = msg["params"].get("request", {}).get("url") or msg["params"].get("url", "")
            if urlsplit(url).scheme in ("http", "https", "ws", "wss"):
                hosts.add(urlsplit(url).hostname or "")
    return hosts


def test_demo_streams_an_answer_to_text_and_image(tiny_artifact: Path, browser: Any, tmp_path: Path,
                                                  huge_image: Path) -> None:  # fmt: skip
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    with demo_server(tiny_artifact, tmp_path) as url:
        port = int(urlsplit(url).port or 0)
        assert set(_listeners(port)) == {"0100007F"}  # 127.0.0.1 only (no 0.0.0.0, no IPv6 wildcard)
        browser.get(url)
        _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#prompt textarea"), what="the chat box")

        # The card panel states the artifact's own figures.
        summary = json.loads((tiny_artifact / "hlwq_report.json").read_text())["summary"]
        card = _text(browser, "#card")
        assert "bits per quantized weight" in card and f"{summary['bits_per_weight_quantized']:.3f}" in card
        assert f"{summary['median_cos_sim']:.6f}" in card and "reference (dequantized at load) on cpu" in card
        kv_note = _text(browser, "#kv_note")
        if importlib.util.find_spec("pipeline.runtime.kv_cache") is None:  # the page says the slider does nothing
            assert "KV cache stays BF16: the KV-cache slider needs pipeline.runtime.kv_cache" in kv_note
        else:
            assert kv_note == ""

        # An empty prompt: a line in the page, nothing sent to the model.
        _send(browser, "   ")
        _wait(browser, lambda b: "⚠ empty prompt" in _text(b, "#chatbot"), 60, "the empty-prompt message")

        # A prompt with the bundled image: the answer grows in the page while it is generated.
        number = browser.find_element(By.CSS_SELECTOR, "#max_new input[type=number]")
        number.clear()
        number.send_keys("96", Keys.ENTER)
        earlier = len(browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]"))
        _send(browser, "hello there", TEST_IMAGE)
        seen: list[str] = []
        live: set[str] = set()
        deadline = time.monotonic() + 180
        while "Last answer" not in (panel := _text(browser, "#stats")):
            live.add(panel)
            assert time.monotonic() < deadline, f"no answer; page: {_text(browser, 'body')[-2000:]}"
            bots = browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")
            if len(bots) > earlier and (t := bots[earlier].text) and (not seen or t != seen[-1]):
                seen.append(t)
            time.sleep(0.02)
        stats = _text(browser, "#stats")
        assert re.search(r"96 tokens in [\d.]+ s · [\d.]+ tok/s decode · .* peak RSS [\d.]+ GB · KV cache BF16", stats)

        final = _settled(browser, "#chatbot [data-testid=bot]")  # the last piece may render after the figures
        # 96 tokens as the slider said; the random model may emit a few special tokens, which are not shown.
        assert re.fullmatch(r"w\d+( w\d+)*", final) and 80 <= len(final.split()) <= 96, final
        partial = [t for t in seen if t != final]
        assert partial and all(final.startswith(t) for t in partial), seen  # streamed: prefixes came first
        assert any(re.search(r"Streaming: \d+ tokens · [\d.]+ tok/s", t) for t in live), live
        assert browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user] img")  # the image is shown
        shot = tmp_path / "demo.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

        # A follow-up: the history (with its image) goes back to the model and a new answer comes.
        _send(browser, "w5 w6")
        _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")) == earlier + 2,
              60, "the follow-up answer")  # fmt: skip
        follow_up = _settled(browser, "#chatbot [data-testid=bot]")
        assert re.fullmatch(r"w\d+( w\d+)*", follow_up) and follow_up != final, follow_up

        # A 56-megapixel image: refused in one readable line.
        _send(browser, "and this?", huge_image)
        _wait(browser, lambda b: "megapixel limit" in _text(b, "#chatbot"), 60, "the huge-image message")
        assert "⚠ image huge.png: 8000x7000 pixels is over the 50-megapixel limit" in _text(browser, "#chatbot")

        assert "Traceback" not in browser.page_source
        assert _page_hosts(browser) == {"127.0.0.1"}  # no fonts, analytics or CDN fetched from elsewhere


def test_demo_says_when_the_artifact_does_not_load(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    broken = tmp_path / "broken-artifact"
    broken.mkdir()
    # A plain model folder, not an HLWQ artifact: its config has no quantization_config.
    (broken / "config.json").write_text(json.dumps({"model_type": "gemma4"}))
    with demo_server(broken, tmp_path) as url:
        browser.get(url)
        _wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#prompt textarea"), what="the chat box")
        card = _text(browser, "#card")
        assert re.search(r"The artifact did not load\.\s*.*config\.json: no quantization_config", card), card
        _send(browser, "hello")
        _wait(browser, lambda b: "⚠ The artifact did not load" in _text(b, "#chatbot"), 60, "the load error")
        assert "Traceback" not in browser.page_source
