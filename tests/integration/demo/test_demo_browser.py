"""``visiondrop demo`` in a real browser: Debian's headless Chromium driven by playwright.

Needs ``.venv-demo`` (``bash scripts/setup.sh demo``: gradio, playwright, and Debian's ``chromium``); skips without
them, so the main suite is unaffected. ``VISIONDROP_REQUIRE_BROWSER=1`` (CI's demo step) turns a missing browser into
a failure. The server is a subprocess of ``visiondrop demo`` on a free loopback port; answers read from the page are
compared with ``visiondrop run``'s for the same image, question and method. A screenshot of the page is saved to
``$VISIONDROP_DEMO_SCREENSHOT`` (default: pytest's tmp folder).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest.importorskip("gradio", reason="the demo's environment: bash scripts/setup.sh demo")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the demo's environment: bash scripts/setup.sh demo"
)

from visiondrop.testbed import make_sample  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless and quiet: no GPU, no sandbox (root in CI), and none of Chromium's own background calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STARTUP_S = 180
ANSWER_TIMEOUT_MS = 120_000

if not Path(CHROMIUM).is_file():
    if os.environ.get("VISIONDROP_REQUIRE_BROWSER"):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium", pytrace=False)
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``visiondrop demo`` on a free loopback port; stopped (and checked to stop) at the end."""
    port = _free_port()
    log = tmp_path_factory.mktemp("demo") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "visiondrop.tools.cli",
                "demo",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"visiondrop demo exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"visiondrop demo did not answer on {url} within {STARTUP_S} s:\n{log.read_text()}")
        time.sleep(0.5)
    yield {"url": url, "proc": proc, "log": log}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.returncode is not None


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the demo; every request that leaves the loopback server is recorded and refused."""
    context = browser.new_context(viewport={"width": 1500, "height": 1000})
    outside: list[str] = []
    host = urlparse(server["url"]).netloc

    def only_loopback(route):
        target = urlparse(route.request.url)
        if target.scheme in ("data", "blob") or target.netloc == host:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    page.goto(server["url"])
    page.wait_for_selector("#run button, button#run", timeout=60_000)
    yield page
    context.close()
    assert outside == [], f"the page tried to reach outside the machine: {outside}"
    assert server["proc"].poll() is None, f"the server died:\n{server['log'].read_text()}"


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def _run_and_wait(page) -> None:
    """Click Run and wait until the method's answer is filled in (the answers start empty on a fresh page)."""
    page.locator("#run").click()
    page.wait_for_function(
        "() => document.querySelector('#answer-a textarea').value.length > 0", timeout=ANSWER_TIMEOUT_MS
    )


def _visiondrop_run(*argv: str) -> tuple[str, str]:
    """``visiondrop run``'s unpruned and pruned answers, read from its printout (our own code path)."""
    out = subprocess.run(
        [sys.executable, "-m", "visiondrop.tools.cli", "run", *argv],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        check=True,
    ).stdout
    unpruned = re.search(r"^unpruned: (.*)$", out, re.M).group(1).strip()
    pruned = re.search(r"^\w+ \(budget [^)]*\): (.*)$", out, re.M).group(1).strip()
    return unpruned, pruned


def _picture_size(page, elem_id: str) -> tuple[int, int]:
    img = page.locator(f"#{elem_id} img").first
    img.wait_for(state="visible", timeout=ANSWER_TIMEOUT_MS)
    page.wait_for_function(
        f"() => {{ const i = document.querySelector('#{elem_id} img'); return i && i.complete && i.naturalWidth > 0; }}"
    )
    box = img.bounding_box()
    natural = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert box is not None and box["width"] > 0 and box["height"] > 0
    return natural[0], natural[1]


def _error_text(page, needle: str) -> str:
    toast = page.locator(".toast-body", has_text=needle).first
    toast.wait_for(state="visible", timeout=ANSWER_TIMEOUT_MS)
    return toast.inner_text()


def test_upload_run_and_read_the_answers(page, tmp_path):
    sample = make_sample("test", 7)
    image = tmp_path / "upload.png"
    sample.image.save(image)
    page.locator("#image input[type=file]").set_input_files(str(image))
    page.locator("#question textarea").fill(sample.question)
    page.locator("#budget textarea, #budget input").first.fill("64")
    _run_and_wait(page)
    shown = (_value(page, "answer-unpruned"), _value(page, "answer-a"))
    assert shown == _visiondrop_run("--image", str(image), "--question", sample.question, "--budget", "64")
    width, height = _picture_size(page, "picture-a")
    assert width > 5 * 336 and height > 336  # input + 4 VisionDrop stages, one panel each
    summary = page.locator("#summary").inner_text()
    assert (
        "576 → 97 → 71 → 52 → 36" in summary
        and "fewer" in summary
        and "schedule (576 tokens/image)" in summary
    )


def test_a_generated_scene_compared_with_a_second_method(page, tmp_path):
    page.locator("#seed input").fill("3")
    page.locator("#scene").click()
    question = make_sample("test", 3).question
    page.wait_for_function(
        f"() => document.querySelector('#question textarea').value === {question!r}",
        timeout=ANSWER_TIMEOUT_MS,
    )
    page.locator("#compare input").click()
    page.get_by_role("option", name="fastv", exact=True).click()
    page.locator("#compare-fields textarea, #compare-fields input").first.fill("layer=3")
    page.locator("#budget textarea, #budget input").first.fill("0.5")
    page.get_by_label("input", exact=True).check()
    _run_and_wait(page)
    page.wait_for_function("() => document.querySelector('#answer-b textarea').value.length > 0")
    common = ("--seed", "3", "--budget", "0.5", "--budget-mode", "input")
    unpruned, visiondrop = _visiondrop_run(*common)
    _, fastv = _visiondrop_run(*common, "--method", "fastv", "--set", "layer=3")
    assert (_value(page, "answer-unpruned"), _value(page, "answer-a"), _value(page, "answer-b")) == (
        unpruned,
        visiondrop,
        fastv,
    )
    _picture_size(page, "picture-a")
    _picture_size(page, "picture-b")
    summary = page.locator("#summary").inner_text()
    assert "fastv" in summary and "288" in summary  # FastV at input 0.5 keeps 288 of 576 after layer 3
    assert f"answer: {make_sample('test', 3).answer}" in summary
    shot = Path(os.environ.get("VISIONDROP_DEMO_SCREENSHOT") or tmp_path / "demo.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_bad_input_shows_the_error_and_the_next_request_is_served(page, tmp_path):
    # No image yet.
    page.locator("#question textarea").fill("what color is the star?")
    page.locator("#run").click()
    assert "no image: upload one or pick a generated scene" in _error_text(page, "no image")
    # A file that is not an image.
    bad = tmp_path / "not_an_image.png"
    bad.write_text("this is text, not pixels")
    page.locator("#image input[type=file]").set_input_files(str(bad))
    page.locator("#run").click()
    assert "image 'not_an_image.png': not a readable image" in _error_text(page, "not a readable image")
    # A good image with a budget out of range, then an unknown field.
    good = tmp_path / "scene.png"
    make_sample("test", 1).image.save(good)
    page.locator("#image button[aria-label='Remove Image']").click()
    page.locator("#image input[type=file]").set_input_files(str(good))
    page.locator("#budget textarea, #budget input").first.fill("577")
    page.locator("#run").click()
    assert "budget=577 is more than the 576 visual tokens" in _error_text(page, "budget=577")
    page.locator("#budget textarea, #budget input").first.fill("64")
    page.locator("#fields textarea, #fields input").first.fill("colour=red")
    page.locator("#run").click()
    assert "visiondrop has no field(s) colour" in _error_text(page, "no field(s) colour")
    assert _value(page, "answer-a") == ""
    # The same page, fixed, is answered.
    page.locator("#fields textarea, #fields input").first.fill("")
    question = make_sample("test", 1).question
    page.locator("#question textarea").fill(question)
    _run_and_wait(page)
    assert (_value(page, "answer-unpruned"), _value(page, "answer-a")) == _visiondrop_run(
        "--image", str(good), "--question", question, "--budget", "64"
    )


def test_requests_from_two_pages_queue_and_are_both_answered(page, server):
    other = page.context.new_page()  # the same context: its requests are held to the server too
    try:
        other.goto(server["url"])
        other.wait_for_selector("#run", timeout=60_000)
        for p in (page, other):
            p.locator("#seed input").fill("4")
            p.locator("#scene").click()
        question = make_sample("test", 4).question
        for p in (page, other):
            p.wait_for_function(
                f"() => document.querySelector('#question textarea').value === {question!r}",
                timeout=ANSWER_TIMEOUT_MS,
            )
        page.locator("#run").click()
        other.locator("#run").click()
        answers = []
        for p in (page, other):
            p.wait_for_function(
                "() => document.querySelector('#answer-a textarea').value.length > 0",
                timeout=ANSWER_TIMEOUT_MS,
            )
            answers.append((_value(p, "answer-unpruned"), _value(p, "answer-a")))
    finally:
        other.close()
    assert answers[0] == answers[1] == _visiondrop_run("--seed", "4", "--budget", "64")
