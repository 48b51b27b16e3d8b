"""The chat web page in a real headless Chromium (Debian's chromium and chromium-driver, which .ci/run installs):
a typed message gets the model's streamed reply, the greedy completion the API gives for the same conversation;
a second turn carries the first. A screenshot of the page goes to CHAT_PAGE_SCREENSHOT when that is set."""
import os
import shutil

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from megatron_llama.data.chat_template import get_chat_template
from test_chat_server import checkpoint, reference, server  # noqa: F401 (fixtures)

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REPLY_TOKENS = 12


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def send_and_wait(browser, text: str) -> str:
    """Type `text`, send it, and return the assistant's reply once streaming has ended (Send enabled again)."""
    turns_before = len(browser.find_elements(By.CSS_SELECTOR, "#log .turn"))
    box = browser.find_element(By.ID, "message")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda page: len(page.find_elements(By.CSS_SELECTOR, "#log .turn")) == turns_before + 2)
    wait.until(lambda page: page.find_element(By.ID, "send").is_enabled())
    reply = browser.find_elements(By.CSS_SELECTOR, "#log .turn")[-1]
    assert "error" not in reply.get_attribute("class"), reply.text
    return reply.get_attribute("textContent")


def test_typed_messages_get_the_models_streamed_greedy_replies(browser, server, reference):  # noqa: F811
    generator, tokenizer = reference
    template = get_chat_template("openllama")
    browser.get(server.url + "/")
    for field, value in (("temperature", "0"), ("max_tokens", str(REPLY_TOKENS))):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    conversation = [{"role": "user", "content": "hello there"}]
    [expected] = generator.generate([template.encode(conversation, tokenizer)], REPLY_TOKENS)
    assert expected.text and send_and_wait(browser, "hello there") == expected.text
    conversation += [{"role": "assistant", "content": expected.text}, {"role": "user", "content": "and then?"}]
    [second] = generator.generate([template.encode(conversation, tokenizer)], REPLY_TOKENS)
    assert send_and_wait(browser, "and then?") == second.text
    if os.environ.get("CHAT_PAGE_SCREENSHOT"):
        browser.save_screenshot(os.environ["CHAT_PAGE_SCREENSHOT"])
