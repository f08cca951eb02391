"""The web page at `/`: its files, and the page itself driven in a real browser.

The browser tests run Debian's Chromium (`/usr/bin/chromium`) through Playwright against the app
served by uvicorn as a real process. Playwright never downloads a browser here; when Chromium or
the `playwright` package is missing, those tests are skipped with the reason.
"""

import base64
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import httpx2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.images import encode, photo
from tests.servers import free_port, wait_until_ready

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, Page

CHROMIUM = Path("/usr/bin/chromium")
# Headless comes from `headless=True` and the fresh profile from the persistent context's
# user_data_dir; without the networking flags Chromium keeps calling out to Google's hosts and
# this closed network refuses it.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TIMEOUT_MS = 25_000
CHELSEA_SIZE = (451, 300)  # width, height of skimage.data.chelsea()


# --- the files, through the ASGI app (no browser) ---------------------------------------------


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value and tag in ("script", "link"):
                self.urls.append(value)


def test_index_page_is_served_and_not_in_the_openapi_schema(tiny_client: TestClient) -> None:
    response = tiny_client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    for element_id in ("model", "file", "method", "target", "run", "image", "heatmap"):
        assert f'id="{element_id}"' in response.text
    for element_id in ("overlay", "predictions", "error"):
        assert f'id="{element_id}"' in response.text
    assert "/" not in tiny_client.get("/openapi.json").json()["paths"]


def test_page_assets_are_local_and_served(tiny_client: TestClient) -> None:
    parser = _Assets()
    parser.feed(tiny_client.get("/").text)
    assert sorted(parser.urls) == ["static/app.js", "static/style.css"]
    types = {"static/app.js": "javascript", "static/style.css": "text/css"}
    for url in parser.urls:
        response = tiny_client.get(f"/{url}")
        assert response.status_code == 200
        assert types[url] in response.headers["content-type"]
        # No CDN, no external URL: the service runs on closed networks.
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]", response.text), url


class _MethodOptions(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.in_method = False
        self.values: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "select":
            self.in_method = found.get("id") == "method"
        elif tag == "option" and self.in_method and found.get("value"):
            self.values.append(str(found["value"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self.in_method = False


def test_the_page_offers_every_method_the_service_has(tiny_client: TestClient) -> None:
    from typing import get_args

    from schemas.explain import ExplainMethod

    parser = _MethodOptions()
    parser.feed(tiny_client.get("/").text)
    offered = parser.values
    assert len(offered) == len(set(offered))
    # `cam` needs a GAP + linear head, which the page cannot know beforehand.
    assert set(offered) == set(get_args(ExplainMethod)) - {"cam"}


def test_a_missing_static_file_is_a_json_404(tiny_client: TestClient) -> None:
    response = tiny_client.get("/static/nope.js")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


# --- the page in Chromium, against a real server ----------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator["BrowserContext"]:
    """Debian's Chromium with a fresh profile, or a skip that says what is missing."""
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: `make test` installs Debian's chromium package "
            "(apt-get install -y chromium, as root or through sudo -n)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(
            "the playwright package is missing: `make test` installs it with the dev extra "
            "(pip install -e '.[dev]'); it drives /usr/bin/chromium, no browser download"
        )

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def server(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`uvicorn` serving the app over the default-model repository, on a free port."""
    port = free_port()
    logs = tmp_path_factory.mktemp("server") / "uvicorn.log"
    env = {
        **os.environ,
        "ONNX_EXPLAIN_MODEL_REPOSITORY": str(default_model_dir),
        "ONNX_EXPLAIN_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "ONNX_EXPLAIN_PROVIDERS": "cpu",
        "ONNX_EXPLAIN_INTRA_OP_THREADS": "2",
        "ONNX_EXPLAIN_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "uvicorn", "service.app:app_from_environment", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with logs.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process, logs)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def page(browser: "BrowserContext", server: str) -> Iterator["Page"]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server}/")
    page.wait_for_function("document.querySelector('#model').options.length > 0")
    yield page
    page.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# Canvas size, number of distinct colours (capped) and, against another canvas, the mean
# absolute difference of their RGB values.
CANVAS_STATS = """([id, otherId]) => {
  const pixels = (c) => c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  const canvas = document.getElementById(id);
  if (!canvas.width || !canvas.height) return {width: 0, height: 0, colours: 0, diff: 0};
  const data = pixels(canvas);
  const colours = new Set();
  for (let i = 0; i < data.length && colours.size < 1000; i += 4) {
    colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  }
  let diff = 0;
  const other = otherId && pixels(document.getElementById(otherId));
  if (other && other.length === data.length) {
    for (let i = 0; i < data.length; i += 4) {
      for (let c = 0; c < 3; c++) diff += Math.abs(data[i + c] - other[i + c]);
    }
    diff /= (data.length / 4) * 3;
  }
  return {width: canvas.width, height: canvas.height, colours: colours.size, diff};
}"""


# A drop event on the drop zone carrying one file, as a drag from the desktop delivers it.
DROP_FILE = """([base64, name, type]) => {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, {type}));
  const zone = document.getElementById("dropzone");
  const init = {dataTransfer: transfer, bubbles: true, cancelable: true};
  zone.dispatchEvent(new DragEvent("drop", init));
}"""


def test_page_explains_the_cat_photo(page: "Page", tmp_path: Path) -> None:
    from playwright.sync_api import expect

    image_path = tmp_path / "chelsea.png"
    assert cv2.imwrite(str(image_path), photo("chelsea")[:, :, ::-1])

    page.select_option("#model", "efficientnet-lite0")
    page.set_input_files("#file", str(image_path))
    expect(page.locator("#target")).to_be_enabled()
    labels = page.locator("#predictions li .label").all_inner_texts()
    assert len(labels) == 5
    assert any(re.search(r"\bcat\b", label) for label in labels), labels
    # The target defaults to the top-1 class.
    top1 = page.locator("#target option:checked").inner_text()
    assert top1.startswith(labels[0])

    page.select_option("#method", "gradcam")
    expect(page.locator("#layer")).to_be_visible()
    page.click("#run")
    page.wait_for_selector("#overlay[data-ready='true']", state="attached")

    expect(page.locator("#error")).to_be_hidden()
    natural = page.eval_on_selector("#image", "img => [img.naturalWidth, img.naturalHeight]")
    assert tuple(natural) == CHELSEA_SIZE
    heatmap: dict[str, Any] = page.evaluate(CANVAS_STATS, ["heatmap", None])
    overlay: dict[str, Any] = page.evaluate(CANVAS_STATS, ["overlay", "heatmap"])
    # `size: input`: the map comes back at the photo's size, and the overlay is drawn at it.
    assert (heatmap["width"], heatmap["height"]) == CHELSEA_SIZE
    assert (overlay["width"], overlay["height"]) == CHELSEA_SIZE
    assert heatmap["colours"] > 10, heatmap
    assert overlay["colours"] > 100, overlay
    # The overlay is the photo blended in, not the heatmap again.
    assert overlay["diff"] > 10, overlay
    assert "gradcam" in page.inner_text("#timings")

    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    pixels = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert pixels is not None
    assert pixels.shape[0] >= 300
    assert pixels.shape[1] >= 800
    assert float(np.std(pixels)) > 20.0


def test_page_shows_the_service_error_for_a_file_that_is_not_an_image(
    page: "Page", server: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file, not a PNG\n")
    answer = httpx2.post(
        f"{server}/v1/models/efficientnet-lite0/predict",
        json={"image": base64.b64encode(fake.read_bytes()).decode()},
        timeout=10,
    )
    assert answer.status_code == 415
    message = answer.json()["error"]["message"]

    page.select_option("#model", "efficientnet-lite0")
    page.set_input_files("#file", str(fake))
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_have_text(message)
    assert page.locator("#predictions li").count() == 0
    expect(page.locator("#target")).to_be_disabled()
    expect(page.locator("#image")).to_be_hidden()
    assert page.get_attribute("#overlay", "data-ready") is None

    # Dropping a real photo on the drop zone replaces the error with predictions.
    photo_png = base64.b64encode(encode(photo("chelsea"))).decode()
    page.evaluate(DROP_FILE, [photo_png, "chelsea.png", "image/png"])
    expect(page.locator("#target")).to_be_enabled()
    expect(error).to_be_hidden()
    assert page.locator("#predictions li").count() == 5
    expect(page.locator("#image")).to_be_visible()


WATCH_PROGRESS = """() => {
  window.progressSeen = [];
  const bar = document.getElementById("progress");
  new MutationObserver(() => {
    if (!bar.hidden) window.progressSeen.push([Number(bar.value), Number(bar.max)]);
  }).observe(bar, { attributes: true });
}"""


def test_page_shows_occlusion_progress_as_it_runs(page: "Page", tmp_path: Path) -> None:
    image_path = tmp_path / "chelsea.png"
    assert cv2.imwrite(str(image_path), photo("chelsea")[:, :, ::-1])
    page.select_option("#model", "efficientnet-lite0")
    page.set_input_files("#file", str(image_path))
    page.wait_for_selector("#target:enabled")
    page.select_option("#method", "occlusion")
    page.fill("#window", "56")
    page.fill("#stride", "14")  # 13 x 13 = 169 occluded copies
    page.evaluate(WATCH_PROGRESS)
    page.click("#run")
    page.wait_for_selector("#overlay[data-ready='true']", state="attached")
    seen: list[list[float]] = page.evaluate("window.progressSeen")
    done = [d for d, _ in seen]
    assert {total for _, total in seen} == {169}
    assert len(set(done)) >= 10, seen
    assert done == sorted(done)
    assert done[-1] == 169
    assert page.locator("#progress").is_hidden()
    assert "occlusion" in page.inner_text("#timings")
