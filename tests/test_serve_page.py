"""The demo page's data (region map, label layout, predict's record) and the page itself in headless Chromium:
upload, hover a row <-> its region, show one class, opacity, switch task, download both files, labels apart."""

import base64
import io
import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mask2former.apps.predict_files import predict_files
from mask2former.data.fashion_scenes import FashionScenes
from mask2former.inference.predictor import Predictor
from mask2former.label_layout import boxes_intersect
from mask2former.serve import SegmentationService
from mask2former.viz import visualize

from test_serve import LABELS, make_model, png_bytes, predict, running_server
from test_serve import _one_torch_thread  # noqa: F401 - the same autouse fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ROWS_KEY = {"panoptic": "segments", "instance": "instances", "semantic": "classes"}


@pytest.fixture(scope="module")
def predictor():
    return Predictor(make_model(), top_k=8, overlap_threshold=0.1)


@pytest.fixture(scope="module")
def server(predictor):
    yield from running_server(predictor)


@pytest.fixture(scope="module")
def scene():
    return FashionScenes("val", num_images=1, image_size=(192, 256))[0]["image"]


def data_url_image(url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url[len(prefix):]))).convert("RGB"))


def strict_load(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_layers_name_each_pixels_row_and_the_overlays_label_layout(server, predictor, scene, task):
    status, body = predict(server, png_bytes(scene), task, layers=1, score_threshold=0.3)
    assert status == 200, body
    rows = body[ROWS_KEY[task]]
    assert len(rows) >= 2
    regions = data_url_image(body["regions_png"]).astype(np.int64)
    row_map = regions[..., 0] + 256 * regions[..., 1] - 1
    result = predictor.predict_tasks([scene], (task,))[0][task]
    if task == "panoptic":
        ids = np.asarray([row["id"] for row in rows] + [0])
        assert np.array_equal(ids[row_map], result[0].numpy())  # row -1 -> void (id 0)
    elif task == "semantic":
        labels = np.asarray([row["label"] for row in rows])
        assert np.array_equal(labels[row_map], result.numpy())
    else:
        for row_index, row in enumerate(rows):  # each instance's pixels not covered by a higher-scoring one
            keep = [i for i, s in enumerate(result["scores"].tolist()) if s >= 0.3]
            mask = result["masks"][keep[row_index]].numpy()
            above = [result["masks"][keep[r]].numpy() for r, other in enumerate(rows) if other["score"] > row["score"]]
            visible = mask & ~np.any(above, axis=0) if above else mask
            assert ((row_map == row_index) == visible).all()
    # the layout is the overlay's: the same boxes, in canvas pixels, named by table row
    options = {"score_threshold": 0.3} if task == "instance" else {}
    _, layout = visualize(scene, result, task, LABELS, return_layout=True, **options)
    labels = body["labels"]
    assert labels["canvas"] == [256 * 2, 192 * 2] and labels["scale"] == 2
    assert [entry["box"] for entry in labels["placed"]] == [list(label.box) for label in layout.placed]
    for entry in labels["placed"]:
        assert entry["text"].startswith(rows[entry["row"]]["category"])
    for a, b in itertools.combinations([entry["box"] for entry in labels["placed"]], 2):
        assert not boxes_intersect(a, b)


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_the_result_json_holds_the_records_predict_writes(scene, tmp_path, task):
    """The page's download = predict's summary entry and results entries for a file of that name."""
    model = make_model()
    service = SegmentationService(Predictor(model))
    path = tmp_path / "scene.png"
    path.write_bytes(png_bytes(scene))
    answer = service.describe(scene, service.run_model(scene, task), task, record_name="scene.png")
    predict_files([path], model=model, task=task, out_dir=tmp_path / "out", progress=False)
    written = strict_load((tmp_path / "out" / ".predict" / task / "scene.json").read_text())
    written["summary"]["file_name"] = "scene.png"  # predict names the path it was given
    assert strict_load(json.dumps(answer["record"])) == {"summary": written["summary"], "results": written["results"]}


def test_page_in_headless_chromium(server, predictor, scene, tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless browser test needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="headless browser test needs selenium")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    image_path = tmp_path / "scene.png"
    image_path.write_bytes(png_bytes(scene))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    # The closed network refuses Chromium's background connections; these flags stop it from trying.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1300,900", "--force-device-scale-factor=1",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    by_id = lambda name: driver.find_element(By.ID, name)  # noqa: E731

    def wait_done():
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                        in ("done", "error"))
        assert by_id("error").text == ""

    def stage_pixels() -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(by_id("stage").screenshot_as_png)).convert("RGB"), dtype=np.float64)

    def label_boxes() -> list[dict]:
        return driver.execute_script(
            "return [...document.querySelectorAll('#labels .label')].filter((g) => g.style.display !== 'none')"
            ".map((g) => g.querySelector('rect').getBoundingClientRect().toJSON());")

    def check_labels_apart():
        stage = by_id("stage").rect
        boxes = label_boxes()
        assert boxes
        for a, b in itertools.combinations(boxes, 2):
            assert not (a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"]
                        and b["top"] < a["bottom"]), (a, b)
        for box in boxes:  # on the picture
            assert stage["x"] - 1 <= box["left"] and box["right"] <= stage["x"] + stage["width"] + 1
            assert stage["y"] - 1 <= box["top"] and box["bottom"] <= stage["y"] + stage["height"] + 1

    try:
        driver.get(server.url)
        WebDriverWait(driver, 10).until(lambda d: "classes" in d.find_element(By.ID, "model-info").text)
        Select(by_id("task")).select_by_value("panoptic")
        by_id("file").send_keys(str(image_path))  # choosing a file runs the model
        wait_done()
        status, body = predict(server, png_bytes(scene), "panoptic", layers=1, record="scene.png")
        rows = body["segments"]
        table_rows = driver.find_elements(By.CSS_SELECTOR, "#segments tbody tr")
        assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in table_rows] == [row["category"] for row in rows]
        assert len(rows) >= 2
        assert [b.text for b in driver.find_elements(By.CSS_SELECTOR, "#legend button")] == \
            [entry["category"] for entry in body["legend"]]
        check_labels_apart()
        # SERVE_SCREENSHOT=docs/serve_screenshot.png refreshes the picture in the docs
        screenshot = Path(os.environ.get("SERVE_SCREENSHOT", tmp_path / "serve.png"))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(screenshot))

        # hover a table row: its region is drawn stronger, the others fainter (pixels of a screenshot)
        regions = data_url_image(body["regions_png"]).astype(np.int64)
        row_map = regions[..., 0] + 256 * regions[..., 1] - 1
        target = int(np.argmax([row["area"] for row in rows]))
        color = np.asarray(rows[target]["color"], dtype=np.float64)
        before = stage_pixels()
        ActionChains(driver).move_to_element(table_rows[target]).perform()
        assert "active" in table_rows[target].get_attribute("class")
        after = stage_pixels()
        shown = np.asarray(Image.fromarray(row_map.astype(np.int32)).resize(
            (before.shape[1], before.shape[0]), Image.NEAREST))
        inside, outside = shown == target, (shown >= 0) & (shown != target)

        def distance(pixels, where, rgb):
            return np.linalg.norm(pixels[where] - rgb, axis=-1).mean()

        assert distance(after, inside, color) < distance(before, inside, color) - 15
        other = np.asarray([rows[r]["color"] for r in shown[outside]], dtype=np.float64)
        assert np.linalg.norm(after[outside] - other, axis=-1).mean() > \
            np.linalg.norm(before[outside] - other, axis=-1).mean() + 10
        # ... and the reverse: point at a region on the picture, its row lights up
        ys, xs = np.nonzero(row_map == 0)
        canvas = by_id("regions")
        scale = canvas.rect["width"] / row_map.shape[1]
        middle = len(ys) // 2
        ActionChains(driver).move_to_element_with_offset(
            canvas, int((xs[middle] + 0.5) * scale - canvas.rect["width"] / 2),
            int((ys[middle] + 0.5) * scale - canvas.rect["height"] / 2)).perform()
        WebDriverWait(driver, 5).until(lambda d: "active" in table_rows[0].get_attribute("class"))
        # keyboard: a focused row is highlighted as a hovered one
        driver.execute_script("arguments[0].focus()", table_rows[-1])
        assert "active" in table_rows[-1].get_attribute("class")
        ActionChains(driver).move_to_element(by_id("model-info")).perform()
        driver.execute_script("document.activeElement.blur()")

        # a legend entry shows only its class: other regions are clear, their rows dimmed, their labels hidden
        only = rows[target]["label"]
        button = driver.find_element(By.CSS_SELECTOR, f"#legend button[data-label='{only}']")
        button.send_keys(Keys.ENTER)  # a button: reachable and pressed with the keyboard
        assert button.get_attribute("aria-pressed") == "true"
        alpha = np.asarray(driver.execute_script(
            "const c = document.getElementById('regions');"
            "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);"),
            dtype=np.uint8).reshape(*row_map.shape, 4)[..., 3]
        same_class = np.isin(row_map, [r for r, row in enumerate(rows) if row["label"] == only])
        assert (alpha[~same_class] == 0).all() and (alpha[same_class] > 0).all()
        dimmed = ["dimmed" in r.get_attribute("class") for r in table_rows]
        assert dimmed == [row["label"] != only for row in rows]
        check_labels_apart()
        button.click()
        assert button.get_attribute("aria-pressed") == "false"

        # opacity: the slider (keyboard: Home / End) sets the regions' alpha inside them
        def inner_alpha():
            return driver.execute_script(
                "const c = document.getElementById('regions'), d = c.getContext('2d')"
                ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
                "for (let p = 0; p < state.regions.length; p++) if (state.regions[p] >= 0 && !state.edges[p])"
                " n = Math.max(n, d[4 * p + 3]); return n;")

        assert inner_alpha() == round(255 * 0.55)
        by_id("opacity").send_keys(Keys.HOME)
        assert inner_alpha() == 0
        by_id("opacity").send_keys(Keys.END)
        assert inner_alpha() == 255

        # switch task: the same image again, without choosing it again
        Select(by_id("task")).select_by_value("semantic")
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "table-title").text.startswith("classes"))
        wait_done()
        status, semantic = predict(server, png_bytes(scene), "semantic", layers=1, record="scene.png")
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in
                driver.find_elements(By.CSS_SELECTOR, "#segments tbody tr")] == \
            [row["category"] for row in semantic["classes"]]
        check_labels_apart()

        # downloads: the overlay PNG the API draws and the records predict writes
        by_id("download-png").click()
        by_id("download-json").click()
        deadline = time.time() + 20
        names = {"scene_semantic.png", "scene_semantic.json"}
        while time.time() < deadline and {p.name for p in downloads.iterdir()} != names:
            time.sleep(0.2)
        assert {p.name for p in downloads.iterdir()} == names
        assert np.array_equal(np.asarray(Image.open(downloads / "scene_semantic.png").convert("RGB")),
                              data_url_image(semantic["overlay_png"]))
        assert strict_load((downloads / "scene_semantic.json").read_text()) == semantic["record"]

        # an error from the API shows in the page
        bad_path = tmp_path / "broken.png"
        bad_path.write_bytes(b"not a picture")
        by_id("file").send_keys(str(bad_path))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
        assert "400" in by_id("error").text
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
