"""The chat page at / in headless Chromium (Debian's /usr/bin/chromium driven by playwright): it asks for the API
key, sends a message with a system prompt, shows the reply as it streams in (the same text the API gives), goes on
to a second turn, and leaves a screenshot in the test's output directory."""
import openai
from playwright.sync_api import sync_playwright

from tests.serving.conftest import API_KEY

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_page_streams_a_reply_and_keeps_the_conversation(server, tmp_path):
    url, name, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    system, first = "You are a helpful assistant.", "Name three colors."
    expected = client.chat.completions.create(
        model=name, temperature=0, max_tokens=40,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": first}]).choices[0].message.content
    assert expected
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(url + "/")
            page.fill("#api_key", API_KEY)
            page.fill("#system", system)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "40")
            page.fill("#input", first)
            page.press("#input", "Enter")
            page.wait_for_function("() => !document.querySelector('#submit').disabled && "
                                   "document.querySelectorAll('.msg.assistant').length === 1", timeout=120_000)
            assert page.inner_text("#model").startswith(f"model: {name}")
            replies = page.locator(".msg.assistant .content")
            assert replies.nth(0).inner_text() == expected.strip() or \
                replies.nth(0).evaluate("e => e.textContent") == expected
            # the page received the reply in several pieces (server-sent events), not at once
            page.fill("#input", "And one more?")
            page.evaluate("""() => { window.__updates = 0; new MutationObserver(() => window.__updates++)
                .observe(document.querySelector('#log'), {childList: true, subtree: true, characterData: true}); }""")
            with page.expect_request("**/v1/chat/completions") as sent:
                page.press("#input", "Enter")
            page.wait_for_function("() => !document.querySelector('#submit').disabled && "
                                   "document.querySelectorAll('.msg.assistant').length === 2", timeout=120_000)
            body = sent.value.post_data_json      # the whole conversation goes with the second message
            assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
            assert body["messages"][2]["content"] == expected and body["stream"] is True
            assert page.evaluate("window.__updates") > 3
            assert page.locator(".msg.user").count() == 2 and page.locator(".msg.error").count() == 0
            shot = tmp_path / "chat_page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert shot.stat().st_size > 5000
        finally:
            browser.close()
