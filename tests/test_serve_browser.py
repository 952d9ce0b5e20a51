"""The page of `reco serve` in a real browser: headless Chromium, driven by selenium, against a
real `reco serve` subprocess over a tiny memory. Marker `browser`; it skips, saying why, where
reco.serve, selenium or Debian's chromium and chromium-driver are missing.

RECO_SCREENSHOT=1 also writes the screenshot of the page with results to docs/serve.png."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, free_port, tiny_clip_args

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
# A caption that would run script or add elements if the page put metadata into HTML.
HOSTILE = '<img src="x" id="pwned"> a <b>bee</b> & "friends"'


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _browser() -> tuple[str | None, str | None]:
    binary = next(
        (
            found
            for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
            if (found := shutil.which(name))
        ),
        None,
    )
    return binary, shutil.which("chromedriver")


if not _has_module("reco.serve.app"):
    pytest.skip("reco.serve is not in this build (no reco/serve/app.py)", allow_module_level=True)
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, CHROMEDRIVER = _browser()
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "needs headless Chromium and its driver (Debian: apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def memory(tmp_path, image_tree, tiny_clip):
    """image_tree's 12 images with captions (one hostile), built into a memory by the CLI; the
    image of ant/0.png is then removed, so that item's thumbnail may 404."""
    from reco.cli import main

    table = tmp_path / "captions.csv"
    with table.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "label"])
        for path in sorted(image_tree.glob("*/*.png")):
            label = path.parent.name
            hostile = (label, path.name) == ("bee", "5.png")
            w.writerow([str(path), HOSTILE if hostile else f"a photo of a {label}.", label])
    out = tmp_path / "mem"
    build = ["build-memory", str(out), "--captions", str(table), "--no-progress"]
    assert main([*build, *tiny_clip_args(tiny_clip)]) == 0
    (image_tree / "ant" / "0.png").unlink()
    return out


@pytest.fixture
def server(tmp_path, memory, tiny_clip):
    """A `reco serve` subprocess (cwd tmp_path, so the installed reco is imported, never the
    checkout's) on a free port with a token: its base URL, once /healthz answers."""
    port = free_port()
    _, weights = tiny_clip
    cmd = [
        sys.executable,
        "-c",
        "import sys; from reco.cli import main; sys.exit(main(sys.argv[1:]))",
        "serve",
        str(memory),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--token",
        TOKEN,
        "--pretrained",
        str(weights),
        "--model-config",
        str(DATA / "reco-tiny-clip.json"),
    ]
    log = (tmp_path / "serve.log").open("w+")
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"reco serve exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                auth = {"Authorization": f"Bearer {TOKEN}"}
                if httpx.get(base + "healthz", headers=auth, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("reco serve did not answer /healthz within 120 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1000,700",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        # A 1000 x 700 viewport (the window's size includes its frame).
        frame = driver.execute_script("return [outerWidth - innerWidth, outerHeight - innerHeight]")
        driver.set_window_size(1000 + frame[0], 700 + frame[1])
        yield driver
    finally:
        driver.quit()


def _wait(driver, what, condition, seconds: float = 30):
    try:
        return WebDriverWait(driver, seconds).until(lambda d: condition(d))
    except TimeoutException:
        status = driver.find_element(By.ID, "status").text
        error = driver.find_element(By.ID, "error").text
        pytest.fail(f"timed out waiting for {what} (status {status!r}, error {error!r})")


def _searched(driver) -> str:
    return _wait(driver, "results", lambda d: " for " in d.find_element(By.ID, "status").text)


def _hits(driver) -> list[dict]:
    """What the page shows of each hit: caption, properties, thumbnail (None when removed)."""
    return driver.execute_script(
        """
        return [...document.querySelectorAll('#results > li')].map((li) => {
          const props = {};
          const dts = li.querySelectorAll('dt');
          for (const dt of dts) props[dt.textContent] = dt.nextElementSibling.textContent;
          const img = li.querySelector('img');
          return {
            caption: li.querySelector('.caption').textContent,
            props,
            img: img && {alt: img.alt, loaded: img.complete && img.naturalWidth > 0},
          };
        });
        """
    )


def test_search_page_in_a_browser(server, browser, image_tree, tmp_path):
    d = browser
    d.get(server)
    assert d.title == "reco search"
    csp = d.find_element(By.CSS_SELECTOR, 'meta[http-equiv="Content-Security-Policy"]')
    assert "script-src 'self'" in csp.get_attribute("content")
    # Every visible control has a label; nothing is loaded from elsewhere.
    unlabelled = d.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter((e) => e.labels.length === 0).map((e) => e.id || e.name)"
    )
    assert unlabelled == []
    external = d.execute_script(
        "return [...document.querySelectorAll('[src], link[href]')]"
        ".map((e) => e.src || e.href).filter((u) => !u.startsWith(location.origin))"
    )
    assert external == []
    assert d.find_element(By.ID, "status").get_attribute("aria-live") == "polite"

    # Without the token: the server's 401 is shown as text and the token field gets the focus.
    box = d.find_element(By.ID, "query-text")
    assert d.switch_to.active_element == box  # autofocus: typing works straight away
    box.send_keys("a photo of a bee.")
    k = d.find_element(By.ID, "query-k")
    k.clear()
    k.send_keys("12")
    box.send_keys(Keys.ENTER)
    error = d.find_element(By.ID, "error")
    _wait(d, "the 401 error", lambda d: error.text)
    assert error.text.startswith("Error 401") and "token" in error.text
    token = d.find_element(By.ID, "token")
    assert d.switch_to.active_element == token

    # With it (Enter in the token field submits the form): every row, captions as plain text.
    token.send_keys(TOKEN, Keys.ENTER)
    _searched(d)
    assert error.text == ""
    hits = _hits(d)
    assert len(hits) == 12
    captions = [h["caption"] for h in hits]
    assert captions.count(HOSTILE) == 1, captions
    assert (
        sorted(c for c in captions if c != HOSTILE)
        == ["a photo of a ant."] * 6 + ["a photo of a bee."] * 5
    )
    assert d.find_elements(By.ID, "pwned") == [] and d.find_elements(By.CSS_SELECTOR, "li b") == []
    scores = [float(h["props"]["score"]) for h in hits]
    assert scores == sorted(scores, reverse=True)
    ids = [int(h["props"]["id"]) for h in hits]
    assert sorted(ids) == list(range(12))
    assert {h["props"]["label"] for h in hits} == {"ant", "bee"}

    # Thumbnails: loaded with the token where the server has the image, removed on a 404.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    codes = {i: httpx.get(f"{server}items/{i}/image", headers=auth).status_code for i in ids}
    assert set(codes.values()) <= {200, 404} and 200 in codes.values()
    _wait(
        d,
        "the thumbnails",
        lambda d: all(
            (h["img"] is None) == (codes[i] == 404) and (h["img"] is None or h["img"]["loaded"])
            for h, i in zip(_hits(d), ids)
        ),
    )
    assert all(h["img"]["alt"] == h["caption"] for h in _hits(d) if h["img"] is not None)

    # A where clause (Enter in its field): only the bees.
    where = d.find_element(By.ID, "query-where")
    k.clear()
    k.send_keys("4")
    where.send_keys("source NOT LIKE '%/ant/%'", Keys.ENTER)
    _wait(d, "the filtered results", lambda d: len(_hits(d)) == 4)
    assert all(h["props"]["label"] == "bee" for h in _hits(d))
    # Bad SQL: the server's message, as text, and no stale results.
    where.clear()
    where.send_keys("nope(", Keys.ENTER)
    _wait(d, "the where error", lambda d: error.text)
    assert error.text.startswith("Error 4") and _hits(d) == []
    where.clear()

    # An image upload: bee/3.png finds itself first (the token box folded away, kept).
    d.find_element(By.CSS_SELECTOR, "#token-box summary").click()
    assert not token.is_displayed()
    d.find_element(By.CSS_SELECTOR, 'input[name="mode"][value="image"]').click()
    assert not box.is_displayed()
    d.find_element(By.ID, "query-image").send_keys(str(image_tree / "bee" / "3.png"))
    k.clear()
    k.send_keys("6")
    d.find_element(By.ID, "search-button").click()
    _wait(d, "the image results", lambda d: "3.png" in d.find_element(By.ID, "status").text)
    first = _hits(d)[0]
    assert len(_hits(d)) == 6 and float(first["props"]["score"]) > 0.99
    assert first["props"]["source"].endswith("bee/3.png")
    _wait(
        d,
        "the thumbnails",
        lambda d: all(h["img"] is None or h["img"]["loaded"] for h in _hits(d)),
    )

    shot = tmp_path / "serve.png"
    assert d.save_screenshot(str(shot))
    if os.environ.get("RECO_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "serve.png")
    # No console errors but the 4xx answers above: a CSP violation or a script error shows here.
    logs = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    logs = [e for e in logs if "Failed to load resource" not in e["message"]]
    assert logs == [], json.dumps(logs, indent=1)
