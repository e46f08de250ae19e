"""End to end in a real headless Chromium: start the app on localhost, type a prompt, click
Generate, wait for both outputs, save a screenshot."""
import pytest

from streamlit_server import CHROMIUM, CHROMIUM_ARGS, dashboard, require_chromium, tiny_world

from utils.suite import EXAMPLE_PROMPTS, FIRST_PROMPT

pytestmark = pytest.mark.slow


def test_type_prompt_generate_and_screenshot(tmp_path):
    from playwright.sync_api import sync_playwright

    require_chromium()
    world = tiny_world(tmp_path, {"tiny-lora": {}})
    with dashboard(world) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        # the first screen: the write-up's own prompt in the box, one example per category of the default corpus
        box = page.get_by_role("textbox", name="Prompt")
        box.wait_for(timeout=60_000)
        assert box.input_value() == FIRST_PROMPT
        for category in EXAMPLE_PROMPTS:
            assert page.get_by_role("button", name=category).count() == 1
        page.get_by_role("button", name="factual").click()
        page.wait_for_function("want => [...document.querySelectorAll('textarea')].some(t => t.value === want)",
                               arg=EXAMPLE_PROMPTS["factual"], timeout=30_000)
        first = tmp_path / "first_screen.png"
        page.screenshot(path=str(first), full_page=True)
        page.get_by_role("textbox", name="Prompt").fill("say cat 3")
        page.keyboard.press("Control+Enter")  # commit the text area value
        page.get_by_role("button", name="Generate").click()
        page.get_by_text("tokens/s").nth(1).wait_for(timeout=120_000)
        assert page.get_by_text("latency").count() >= 2
        assert page.locator(".st-key-reply_A").count() == 1 and page.locator(".st-key-reply_B").count() == 1
        shot = tmp_path / "compare.png"  # tests never write into the checkout
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000 and first.stat().st_size > 10_000
