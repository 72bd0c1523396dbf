"""The web chat in headless Chromium: send a message, watch thinking and answer stream in, collapse it."""

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("NANOSEEK_REQUIRE_BROWSER") == "1"  # set by .ci/run, which installs chromium


@pytest.mark.skipif(CHROMIUM is None and not REQUIRED, reason="Debian's chromium is not installed")
def test_chat_page_streams_thinking_and_answer(live_server, tmp_path):
    assert CHROMIUM, "chromium is required here: apt-get install chromium"
    from playwright.sync_api import expect, sync_playwright

    url, _ = live_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url + "/?api_key=sekrit")  # with --api-key the page itself needs the key
        assert page.url == url + "/" and page.input_value("#key") == "sekrit"
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "40")
        page.fill("#input", "What is 12 + 30?")
        page.click("#send")
        assistant = page.locator(".msg.assistant")
        expect(assistant.locator(".reasoning")).not_to_be_empty(timeout=30_000)
        expect(assistant.locator(".answer")).not_to_be_empty(timeout=30_000)
        expect(page.locator("#send")).to_be_enabled(timeout=30_000)  # the stream finished
        details = assistant.locator("details.thinking")
        assert details.get_attribute("open") is None  # collapsed once the answer began
        details.locator("summary").click()
        assert details.get_attribute("open") is not None
        details.locator("summary").click()
        assert details.get_attribute("open") is None
        assert assistant.locator(".reasoning").text_content().strip()  # still there, only hidden
        details.locator("summary").click()
        page.screenshot(path=str(tmp_path / "chat.png"))
        page.click("#new-chat")
        expect(page.locator(".msg")).to_have_count(0)
        assert all(r.startswith(url) for r in requests)  # nothing fetched from anywhere else
        browser.close()
