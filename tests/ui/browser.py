"""Test helpers (not part of the package): drive `piflow ui` in headless Chromium through Selenium — the browser
test's steps and the README screenshot.

Uses Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``); nothing is
downloaded. `unavailable()` says why a browser session cannot run here (None when it can).

    python tests/ui/browser.py docs/images/ui_playground.png     # the README screenshot (`make screenshot`)
"""
from __future__ import annotations

import contextlib
import io
import shutil
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1400, 1900)


def unavailable() -> Optional[str]:
    """Why a headless-browser session cannot run on this machine, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).is_file() and shutil.which(Path(path).name) is None:
            return f"{path} is missing (apt-get install {package})"
    for module, extra in (("selenium", "test"), ("gradio", "ui")):
        try:
            __import__(module)
        except ImportError:
            return f"the Python package {module!r} is missing (pip install 'piflow[{extra}]')"
    return None


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Serve a `build_app` app on a free 127.0.0.1 port in this process; yields its URL, closes it after."""
    from piflow.ui.app import serve

    port = free_port()
    serve(app, port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


@contextlib.contextmanager
def chromium(window: tuple[int, int] = WINDOW):
    """A headless Chromium `webdriver.Chrome` (Debian's binary and driver), quit after the block."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={window[0]},{window[1]}", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver_path = CHROMEDRIVER if Path(CHROMEDRIVER).is_file() else shutil.which("chromedriver")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The app's page in a driver: set fields and read components by their ``elem_id``."""

    def __init__(self, driver, url: str, timeout: float = 60.0):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.timeout, self.By = driver, timeout, By
        driver.get(url)
        WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.ID, "pg-generate"))

    def element(self, elem_id: str):
        return self.driver.find_element(self.By.ID, elem_id)

    def set(self, elem_id: str, value) -> None:
        """Type `value` into the input (or textarea) of component `elem_id` and leave the field."""
        from selenium.webdriver.common.keys import Keys

        field = self.element(elem_id).find_element(self.By.CSS_SELECTOR, "input, textarea")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.BACKSPACE)
        field.send_keys(str(value))
        field.send_keys(Keys.TAB)

    def click(self, elem_id: str) -> None:
        self.element(elem_id).click()

    def tab(self, title: str) -> None:
        """Open the tab whose button reads `title`."""
        for button in self.driver.find_elements(self.By.CSS_SELECTOR, "button[role='tab']"):
            if button.text.strip() == title:
                button.click()
                return
        raise ValueError(f"no tab {title!r}")

    def text(self, elem_id: str) -> str:
        return self.element(elem_id).text.strip()

    def image_src(self, elem_id: str) -> Optional[str]:
        images = self.element(elem_id).find_elements(self.By.TAG_NAME, "img")
        return images[0].get_attribute("src") if images else None

    def wait(self, condition, what: str, timeout: Optional[float] = None):
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout or self.timeout, poll_frequency=0.05).until(
                lambda d: condition())
        except Exception as error:
            if type(error).__name__ == "TimeoutException":
                raise TimeoutError(f"timed out waiting for {what}") from None
            raise

    def wait_new_image(self, elem_id: str, previous: Optional[str]) -> str:
        """Wait until component `elem_id` shows an image other than `previous`; its src."""
        return self.wait(lambda: (lambda src: src if src and src != previous else None)(self.image_src(elem_id)),
                         f"a new image in #{elem_id}")

    def wait_text(self, elem_id: str, timeout: Optional[float] = None) -> str:
        return self.wait(lambda: self.text(elem_id) or None, f"text in #{elem_id}", timeout)

    def pixels(self, elem_id: str) -> np.ndarray:
        """The RGB pixels (H, W, 3) uint8 of the image component `elem_id`, fetched from its src."""
        from PIL import Image

        src = self.image_src(elem_id)
        if src is None:
            raise ValueError(f"#{elem_id} shows no image")
        with urllib.request.urlopen(src, timeout=30) as response:       # the app's own file route
            data = response.read()
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))


def is_blank(pixels: np.ndarray) -> bool:
    """True when an image is (nearly) one colour: fewer than 1 % of its pixels differ from the commonest value."""
    flat = pixels.reshape(-1, pixels.shape[-1])
    values, counts = np.unique(flat, axis=0, return_counts=True)
    return counts.max() > 0.99 * len(flat)


@dataclass
class PlaygroundRun:
    """What one generate click in the playground produced, as the browser saw it."""

    timing: str
    teacher: np.ndarray
    student: np.ndarray
    detail: np.ndarray
    seconds: float          # from the click until the student image was shown


def playground_run(page: Page, nfe: int, seed: int, batch: Optional[int] = None,
                   model: Optional[str] = None) -> PlaygroundRun:
    """Set NFE and seed (and batch), click Generate, wait for the new images and read them and the timing text."""
    if model is not None:
        dropdown = page.element("pg-model").find_element(page.By.CSS_SELECTOR, "input")
        dropdown.click()
        for option in page.driver.find_elements(page.By.CSS_SELECTOR, "ul[role='listbox'] li"):
            if option.text.strip() == model:
                option.click()
                break
        else:
            raise ValueError(f"no model {model!r} in the dropdown")
        time.sleep(1.0)                                  # the class list and batch follow the model
    page.set("pg-nfe", nfe)
    page.set("pg-seed", seed)
    if batch is not None:
        page.set("pg-batch", batch)
    previous = page.image_src("pg-student")
    start = time.perf_counter()
    page.click("pg-generate")
    page.wait_new_image("pg-student", previous)
    seconds = time.perf_counter() - start
    page.wait(lambda: f"student {nfe} NFE" in page.text("pg-timing") and f"seed {seed}" in page.text("pg-timing"),
              "the timing text of this run")
    page.wait(lambda: page.image_src("pg-detail") is not None, "the detail image")
    return PlaygroundRun(page.text("pg-timing"), page.pixels("pg-teacher"), page.pixels("pg-student"),
                         page.pixels("pg-detail"), seconds)


def write_screenshot(path: Path, nfe: int = 4, seed: int = 0) -> PlaygroundRun:
    """The README screenshot: the playground after one generation (digits, 4 NFE, batch 16), full page."""
    from piflow.ui.app import build_app

    reason = unavailable()
    if reason:
        raise RuntimeError(f"cannot take the screenshot: {reason}")
    with serving(build_app()) as url, chromium() as driver:
        page = Page(driver, url)
        run = playground_run(page, nfe, seed, batch=16)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(WINDOW[0], min(int(height) + 40, 4000))
        time.sleep(0.5)
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    return run


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/ui_playground.png")
    result = write_screenshot(target)
    print(f"screenshot written to {target}; {result.timing}; click to image {result.seconds:.2f} s")
