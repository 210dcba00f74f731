"""`piflow ui` in a real headless browser (Debian's Chromium through Selenium): generate in the playground, read
the timing and the rendered pixels, change the seed, show a bad-input message, and drive the text-to-image tab on
a tiny random FLUX pipeline."""
import numpy as np
import pytest

import browser      # tests/ui/browser.py (pytest puts tests/ui on sys.path)

REASON = browser.unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"no headless browser here: {REASON}"),
              pytest.mark.slow]


@pytest.fixture(scope="module")
def page(tiny_flux):
    from piflow.ui.app import build_app

    with browser.serving(build_app(pipeline=tiny_flux[0], adapter=tiny_flux[1])) as url, \
            browser.chromium() as driver:
        yield browser.Page(driver, url)


def test_playground_renders_and_the_seed_changes_the_images(page, tmp_path):
    first = browser.playground_run(page, nfe=3, seed=11, batch=16)
    assert "student 3 NFE" in first.timing and "seed 11" in first.timing and "batch 16" in first.timing
    for pixels in (first.teacher, first.student, first.detail):
        assert not browser.is_blank(pixels)
    page.driver.save_screenshot(str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000
    second = browser.playground_run(page, nfe=3, seed=12)
    assert first.student.shape == second.student.shape and not np.array_equal(first.student, second.student)
    page.set("pg-nfe", 0)
    page.click("pg-generate")
    assert page.wait_text("pg-message") == "⚠️ NFE must be a whole number in [1, 8], got 0"
    again = browser.playground_run(page, nfe=1, seed=12)          # the app keeps serving
    assert "student 1 NFE" in again.timing and page.text("pg-message") == ""


def test_text_to_image_tab(page):
    page.tab("Text-to-image / editing")
    page.wait(lambda: "loaded PiFluxPipeline" in page.text("t2i-status"), "the pipeline to load")
    page.set("t2i-width", 33)
    page.set("t2i-height", 16)
    page.click("t2i-swap")
    page.wait(lambda: page.element("t2i-width").find_element(page.By.CSS_SELECTOR, "input").get_attribute("value")
              == "16", "the swap")
    page.click("t2i-generate")
    assert "height must be a multiple of 4" in page.wait_text("t2i-message")
    page.set("t2i-height", 24)
    page.element("t2i-random").find_element(page.By.CSS_SELECTOR, "input").click()      # reuse the seed
    page.set("t2i-seed", 5)
    page.set("t2i-steps", 2)
    page.click("t2i-generate")
    page.wait_new_image("t2i-image", None)
    assert page.image_src("t2i-image") and page.pixels("t2i-image").shape == (24, 16, 3)
    settings = page.wait_text("t2i-settings")
    assert "seed 5, 16×24, 2 steps" in settings and "manual_seed(5)" in settings
    page.tab("Playground")
