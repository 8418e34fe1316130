"""The chat page (`qwen2 serve`'s /) in a real headless browser: Debian's chromium, driven by Selenium
through the chromedriver of the same package. The README's test command installs both when apt can;
without them this test fails and says how to install them.

The page is loaded from a live server running the real embedded model; a message is typed and sent as a
user would (Enter in the text box); the test then watches the reply bubble grow piece by piece (a
MutationObserver records every change, so one final render cannot pass for streaming) and checks the
finished text against the same greedy request made through the API without the page.

    QWEN2_SCREENSHOT=docs/chat-page.png python -m pytest tests/test_browser.py   # refresh the committed screenshot
"""
import os
import shutil

import httpx
import pytest

from qwen2.serve.app import create_app, serve_in_background

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
QUESTION = "Write a Python function that checks whether a number is prime."
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: install them with "
                    "`sudo apt-get install chromium chromium-driver` (the README's test command does when it can)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800",
                 "--disable-gpu", "--no-proxy-server"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def chat_server(real_model):
    with serve_in_background(create_app(real_model, max_batch=2, max_model_len=512)) as url:
        yield url


def test_chat_page_streams_an_answer_in_a_headless_browser(browser, chat_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(chat_server + "/")
    wait = WebDriverWait(browser, 120)
    assert browser.title == "qwen2 chat"
    wait.until(lambda d: d.find_element(By.ID, "model").text)  # /v1/models answered: the page knows the model
    model_id = browser.find_element(By.ID, "model").text
    browser.find_element(By.CSS_SELECTOR, "details summary").click()  # open Settings, as a user would
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys(str(MAX_TOKENS))

    # Record the reply bubble's text at every change, from before the message is sent.
    browser.execute_script("""
        window.seen = [];
        new MutationObserver(() => {
          const reply = document.querySelector('#log .assistant');
          if (reply) window.seen.push(reply.textContent);
        }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
    """)
    box = browser.find_element(By.ID, "input")
    box.send_keys(QUESTION)
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "stats").text)  # written once the stream has ended

    user = browser.find_element(By.CSS_SELECTOR, "#log .user").text
    reply = browser.find_element(By.CSS_SELECTOR, "#log .assistant")
    assert user == QUESTION
    assert "error" not in reply.get_attribute("class"), reply.text
    stats = browser.find_element(By.ID, "stats").text
    assert f"{MAX_TOKENS} tokens" in stats and "tokens/s" in stats and "(length)" in stats, stats

    # Streamed: the bubble went through several growing, non-empty states before the final one.
    seen = [text for text in browser.execute_script("return window.seen") if text]
    assert len(set(seen)) >= 5, seen
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), seen
    final = browser.execute_script("return document.querySelector('#log .assistant').textContent")
    assert seen[-1] == final

    # The same greedy request without the page gives the same text.
    body = {"model": model_id, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": MAX_TOKENS}
    answer = httpx.post(chat_server + "/v1/chat/completions", json=body, timeout=120).json()
    assert answer["choices"][0]["message"]["content"] == final

    shot = os.environ.get("QWEN2_SCREENSHOT") or str(tmp_path / "chat-page.png")
    assert browser.save_screenshot(shot)
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
