"""One visit in headless Chromium (Debian's package, driven by playwright): upload, ask, watch the answer stream in."""

import itertools
import shutil
import time

from demo_server import CHECKPOINT_LABEL
from playwright.sync_api import expect, sync_playwright

from vlm.files import EXAMPLES_DIR

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Every text the answer bubble shows, recorded by the page itself so no streamed step is missed between polls.
RECORD_ANSWER_TEXTS = """() => {
  window.answerTexts = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('#chat [data-testid=bot]');
    const text = bots.length ? bots[bots.length - 1].innerText : '';
    if (text && text !== window.answerTexts[window.answerTexts.length - 1]) window.answerTexts.push(text);
  }).observe(document.querySelector('#chat'), {childList: true, subtree: true, characterData: true});
}"""


def test_upload_an_image_ask_and_see_the_answer_stream_in(demo_url, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, (
        "Debian's chromium is not installed; the README's test step installs it (apt-get install -y chromium)"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium,
                                                                headless=True, args=CHROMIUM_FLAGS,
                                                                viewport={"width": 1280, "height": 1000})
        try:
            page = browser.new_page()
            page.goto(demo_url)
            expect(page.locator("#status")).to_contain_text(CHECKPOINT_LABEL)
            expect(page.locator("#chat")).to_be_attached()  # the observer below needs the chat rendered
            page.evaluate(RECORD_ANSWER_TEXTS)
            page.set_input_files("#question input[type=file]", str(EXAMPLES_DIR / "shape_0.png"))
            page.fill("#question textarea", "What shape is in the image?")
            page.press("#question textarea", "Enter")
            expect(page.locator("#chat [data-testid=user] img")).to_be_attached(timeout=30_000)
            texts = wait_until_the_answer_settles(page)
            page.screenshot(path=tmp_path / "demo.png", full_page=True)
        finally:
            browser.close()
    assert len(texts) >= 3, f"the answer appeared in {len(texts)} step(s), not streamed: {texts}"
    assert all(len(a) < len(b) for a, b in itertools.pairwise(texts)), "the streamed answer did not only grow"
    print(f"screenshot: {tmp_path / 'demo.png'}; answer steps: {[len(t) for t in texts]}")


def wait_until_the_answer_settles(page, quiet_s=2.0, limit_s=90.0) -> list[str]:
    deadline = time.monotonic() + limit_s
    texts, changed = [], time.monotonic()
    while time.monotonic() - changed < quiet_s or not texts:
        assert time.monotonic() < deadline, f"no finished answer within {limit_s} s; saw {texts}"
        time.sleep(0.2)
        now = page.evaluate("window.answerTexts")
        if now != texts:
            texts, changed = now, time.monotonic()
    return texts
