"""The app in a real browser: `vtfusion ui` on 127.0.0.1 over a small generated collection,
driven by Debian's headless Chromium through chromedriver (installed from Debian's packages
when missing). Asserts that result images really rendered, that a bad upload shows a message,
and that the "why" heatmap appears. Screenshots land in the test's temporary folder (and in
$VTFUSION_SCREENSHOTS when set)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from vtfusion.indexer.collection import Collection
from vtfusion.indexer.ingest import ingest

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--window-size=1400,1100",
]
QUERY = "a large red checkered hat"


def _install_chromium() -> None:
    """Debian's chromium + chromium-driver, when not on the machine yet (needs root and apt)."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]
        if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            subprocess.run(cmd, env=env, capture_output=True)
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        msg = "Debian's chromium and chromium-driver are not installed and could not be installed"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir, small_catalog):
    _install_chromium()
    folder = tmp_path_factory.mktemp("browsercol") / "c"
    c = Collection.init(folder, model_dir)
    ingest(c, small_catalog / "train.csv", workers=0, progress=False)
    c.close()
    port = _free_port()
    log = open(tmp_path_factory.mktemp("uilog") / "ui.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vtfusion.ui.cli", "ui", str(folder), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the ui did not come up: {Path(log.name).read_text()[-2000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for f in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(f)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _shot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("VTFUSION_SCREENSHOTS"):
        out = Path(os.environ["VTFUSION_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / name)
    return path


LOADED_MEDIA_IMAGES = (
    "return Array.from(document.images).filter(i => i.src.includes('/media/') && i.complete && i.naturalWidth > 0).length"
)


def _search(driver, url: str, query: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    box = WebDriverWait(driver, 60).until(EC.element_to_be_clickable((By.CSS_SELECTOR, "input[aria-label='Search']")))
    box.send_keys(query + Keys.ENTER)


def test_query_renders_result_images(server, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    _search(browser, server, QUERY)
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(LOADED_MEDIA_IMAGES) >= 12)
    widths = browser.execute_script(
        "return Array.from(document.images).filter(i => i.src.includes('/media/')).map(i => i.naturalWidth)"
    )
    assert len(widths) == 12 and min(widths) > 0
    body = browser.find_element("tag name", "body").text
    assert "ITC cosine" in body and "ITM prob" in body and "fused" in body and "Timings: encode" in body
    assert "Traceback" not in body
    assert _shot(browser, tmp_path, "search.png").stat().st_size > 10_000


def test_why_heatmap_appears(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _search(browser, server, QUERY)
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(LOADED_MEDIA_IMAGES) >= 12)

    def why_buttons(d):
        return [b for b in d.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Why?"]

    WebDriverWait(browser, 60).until(lambda d: len(why_buttons(d)) >= 12)  # the images can land before the buttons
    why = why_buttons(browser)
    assert len(why) == 12
    browser.execute_script("arguments[0].click()", why[0])
    WebDriverWait(browser, 60).until(lambda d: "cross-attention from" in d.find_element(By.TAG_NAME, "body").text)
    WebDriverWait(browser, 60).until(lambda d: d.execute_script(LOADED_MEDIA_IMAGES) >= 14)
    heading = browser.find_element(By.XPATH, "//*[starts-with(normalize-space(.), 'Why item #')]")
    browser.execute_script("arguments[0].scrollIntoView()", heading)
    _shot(browser, tmp_path, "why.png")


def test_invalid_upload_shows_message(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    fake = tmp_path / "holiday.jpg"
    fake.write_text("this is a text file named .jpg")
    browser.get(server)
    field = WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "input[type='file']"))[0]
    field.send_keys(str(fake))
    WebDriverWait(browser, 60).until(lambda d: "not an image" in d.find_element(By.TAG_NAME, "body").text)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "holiday.jpg" in body and "Traceback" not in body
    _shot(browser, tmp_path, "bad-upload.png")


def test_collection_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    label = WebDriverWait(browser, 60).until(
        lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "label") if e.text.strip() == "Collection"]
    )[0]
    label.click()
    WebDriverWait(browser, 60).until(lambda d: "Active items" in d.find_element(By.TAG_NAME, "body").text)
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Ingest errors" in body and "Verify" in body and "Traceback" not in body
    _shot(browser, tmp_path, "collection.png")
