"""The search page in Debian's headless Chromium (selenium + chromedriver) against uvicorn on
127.0.0.1: type a caption, see the grid of hits (the API's answer, thumbnails loaded), click a
hit and see its alignment picture; upload an image and see captions. Skipped only where
chromium or chromedriver is not installed (CI installs both)."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from hatmodel import checkpoint as ckpt
from hatmodel.config import load_config
from hatmodel.data import build_tokenizer
from hatmodel.index import build_index
from hatmodel.models import build_model
from hatmodel.serve import SearchService, create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
    "chromium-driver)",
)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--no-first-run", "--disable-component-update",
         "--disable-sync", "--window-size=1280,900"]
CAPTION = "a large red circle and a small blue square"
WAIT_S = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """uvicorn in a background thread on a free port of 127.0.0.1, serving a hat_tiny model
    (random weights: the page, not the ranking, is under test) over its test split."""
    root = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    cfg = load_config("hat_tiny")
    model = build_model(cfg, build_tokenizer(cfg).vocab_size).eval()
    ckpt.save_weights(root / "run" / "best.safetensors", model, cfg, 0)
    for side in ("images", "texts"):
        build_index(root / "run", root / side, side, progress=False)
    app = create_app(SearchService.load([root / "images", root / "texts"], root / "run"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def _wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition, message=f"waiting for {what}")


def _loaded(driver, element) -> bool:
    return driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                 element) > 0


def _hits(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#results .hit")


def test_caption_to_grid_to_alignment_picture(server, browser):
    from selenium.webdriver.common.by import By

    url, _ = server
    browser.get(url)
    _wait(browser, lambda d: "20 images" in d.find_element(By.ID, "info").text, "the info line")
    box = browser.find_element(By.ID, "text")
    box.send_keys(CAPTION)
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("6")
    browser.find_element(By.ID, "search").click()
    _wait(browser, lambda d: len(_hits(d)) == 6, "six hits")
    expected = httpx.get(f"{url}/api/search", params={"text": CAPTION, "k": 6}).json()["hits"]
    hits = _hits(browser)
    assert [h.get_attribute("data-id") for h in hits] == [h["id"] for h in expected]
    for hit, want in zip(hits, expected):
        assert want["id"] in hit.text and f"score {want['score']:.3f}" in hit.text
    _wait(browser, lambda d: all(_loaded(d, h.find_element(By.TAG_NAME, "img"))
                                 for h in _hits(d)), "the thumbnails")
    hits[1].click()
    picture = browser.find_element(By.ID, "explain")
    _wait(browser, lambda d: _loaded(d, picture), "the alignment picture")
    assert browser.find_element(By.ID, "why").is_displayed()
    assert expected[1]["id"] in browser.find_element(By.ID, "why-title").text
    assert browser.execute_script("return arguments[0].naturalWidth", picture) > 400
    assert "selected" in hits[1].get_attribute("class")


def test_bad_query_shows_the_message_and_the_page_keeps_working(server, browser):
    from selenium.webdriver.common.by import By

    url, _ = server
    browser.get(url)
    _wait(browser, lambda d: "20 images" in d.find_element(By.ID, "info").text, "the info line")
    browser.find_element(By.ID, "text").send_keys("   ")
    browser.find_element(By.ID, "search").click()
    status = browser.find_element(By.ID, "status")
    _wait(browser, lambda d: "text: expected a non-empty caption" in status.text, "the error")
    assert "error" in status.get_attribute("class") and not _hits(browser)
    browser.find_element(By.ID, "text").send_keys(CAPTION)
    browser.find_element(By.ID, "search").click()
    _wait(browser, lambda d: len(_hits(d)) == 12, "twelve hits")


def test_image_upload_to_captions_to_alignment_picture(server, browser):
    from selenium.webdriver.common.by import By

    url, root = server
    scene = root / "scene.png"
    scene.write_bytes(httpx.get(f"{url}/api/item/image-5").content)
    browser.get(url)
    _wait(browser, lambda d: "20 images" in d.find_element(By.ID, "info").text, "the info line")
    browser.find_element(By.ID, "file").send_keys(str(scene))
    _wait(browser, lambda d: len(_hits(d)) == 12, "twelve caption hits")
    hits = _hits(browser)
    assert all(h.get_attribute("data-id").startswith("caption-") for h in hits)
    hits[0].click()
    picture = browser.find_element(By.ID, "explain")
    _wait(browser, lambda d: _loaded(d, picture), "the alignment picture of the upload")
    assert "why the image matched" in browser.find_element(By.ID, "why-title").text
