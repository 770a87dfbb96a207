"""The README's picture of the demo page: ``mask2former serve`` on a crowded FashionScenes image in headless Chromium,
one table row hovered (its region highlighted), saved as a PNG.

    python scripts/serve_screenshot.py --checkpoint runs/fashion_scenes/model_final [--out docs/serve_screenshot.png]

Needs Debian's ``chromium`` and ``chromium-driver`` and ``selenium`` (as the browser test does).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from mask2former.data.fashion_scenes import FashionScenes
from mask2former.serve import make_server


def crowded_image(seed: int, size: int) -> np.ndarray:
    """A FashionScenes val image with ten items on three background regions (the built-in sets have 2-10)."""
    scenes = FashionScenes("val", num_images=1, seed=seed, image_size=size, min_items=10, max_items=10,
                           item_scale=(0.12, 0.25), min_regions=3, max_regions=3)
    return scenes[0]["image"].permute(1, 2, 0).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default="docs/serve_screenshot.png")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--hover-row", type=int, default=0, help="the table row to hover (-1: none)")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    work = Path(tempfile.mkdtemp(prefix="serve-screenshot-"))
    image_path = work / "crowded_scene.png"
    Image.fromarray(crowded_image(args.seed, args.size)).save(image_path)
    server = make_server(args.checkpoint, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", "--force-device-scale-factor=1",
                 f"--user-data-dir={work / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    try:
        driver.get(server.url)
        WebDriverWait(driver, 30).until(lambda d: "classes" in d.find_element(By.ID, "model-info").text)
        driver.find_element(By.ID, "file").send_keys(str(image_path))
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                         in ("done", "error"))
        rows = driver.find_elements(By.CSS_SELECTOR, "#segments tbody tr")
        if args.hover_row >= 0 and rows:
            ActionChains(driver).move_to_element(rows[min(args.hover_row, len(rows) - 1)]).perform()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        labels = len(driver.find_elements(By.CSS_SELECTOR, "#labels .label"))
        print(f"{len(rows)} segments, {labels} labels on the picture; written {args.out}")
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
