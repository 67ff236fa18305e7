"""The chat page in a real browser: headless Chromium (Debian's package) driven by Selenium.

The server runs on its own event loop in a thread, so the blocking WebDriver calls never stall it.
Screenshots land in tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from bots.web.server import create_adapter
from conftest import make_config, make_settings
from core.config.schema import Config
from core.conversation import ConversationKey
from core.service import open_service
from trap_model import PROMPT, TRAPS, cached_trap_model

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
API_KEY = "page-key-77d1c0"

# Records every text a bot message shows, in order: proof that the reply streamed in.
RECORD_BOT_TEXTS = """
window.botTexts = [];
new MutationObserver((records) => {
  for (const record of records) {
    if (!record.target.classList || !record.target.classList.contains("bot")) continue;
    for (const node of record.addedNodes) if (node.nodeType === Node.TEXT_NODE) window.botTexts.push(node.data);
  }
}).observe(document.getElementById("log"), {childList: true, subtree: true});
"""
MESSAGES = "return Array.from(document.querySelectorAll('#log .message'), m => [m.className, m.textContent]);"


class ServerThread:
    """Service and web adapter on an event loop of their own."""

    def __init__(self, config: Config, environ: dict[str, str] | None = None):
        self.config, self.environ = config, environ
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="web-server", daemon=True)

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        self.service = await open_service(self.config)
        self.adapter = create_adapter(self.service, make_settings(self.config, self.environ))
        await self.adapter.start()
        self.url = f"http://127.0.0.1:{self.adapter.port}/"

    def __exit__(self, *_) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _stop(self) -> None:
        await self.adapter.stop()
        await self.service.close()

    def turns(self, conversation: str) -> list[tuple[str, str]]:
        turns = self.run(self.service.store.recent_turns(ConversationKey("web", conversation), 50))
        return [(t.role, t.text) for t in turns]

    def persona(self, conversation: str) -> str | None:
        return self.run(self.service.store.persona(ConversationKey("web", conversation)))


@pytest.fixture
def config(tmp_path, word_model_dir, word_chat_model_dir) -> Config:
    traps = {"model": str(cached_trap_model()), "format": "dialogpt", "description": "says tricky words",
             "decoding": {"do_sample": False, "max_new_tokens": 32}}
    return make_config(tmp_path, word_model_dir, word_chat_model_dir, web={"port": 0}, service={"max_input_chars": 60},
                       personas={"traps": traps})


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (make test installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1000,800",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(20)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, timeout: float = 20):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; page shows {driver.execute_script(MESSAGES)}") from None


def messages(driver) -> list[tuple[str, str]]:
    """(kind, text) of each message in the log; kind is user, bot or note (+ error)."""
    return [(cls.replace("message ", ""), text) for cls, text in driver.execute_script(MESSAGES)]


def ready(driver) -> bool:
    return driver.find_element(By.ID, "input").is_enabled()


def send(driver, text: str) -> None:
    wait_for(driver, ready, "the input box")
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / name))


@pytest.mark.timeout(120, func_only=True)
def test_chat_page_streams_keeps_history_and_switches_persona(config, browser):
    with ServerThread(config) as server:
        browser.get(server.url)
        wait_for(browser, ready, "the page to load")
        picker = Select(browser.find_element(By.ID, "persona"))
        assert [o.text for o in picker.options] == ["words", "missing (unavailable)", "wordchat", "traps"]
        assert picker.first_selected_option.get_attribute("value") == "words"
        assert browser.find_element(By.ID, "persona-description").text == "plays the word game"
        conversation = browser.execute_script("return localStorage.getItem('ttt.conversation')")

        browser.execute_script(RECORD_BOT_TEXTS)
        send(browser, "the word is apple")
        wait_for(browser, lambda d: messages(d) == [("user", "the word is apple"), ("bot", "apple!")] and ready(d),
                 "the reply")
        assert server.turns(conversation) == [("user", "the word is apple"), ("bot", "apple!")]

        browser.refresh()
        wait_for(browser, lambda d: messages(d) == [("user", "the word is apple"), ("bot", "apple!")] and ready(d),
                 "the history after a reload")
        assert browser.execute_script("return localStorage.getItem('ttt.conversation')") == conversation
        send(browser, "again")
        wait_for(browser, lambda d: messages(d)[-2:] == [("user", "again"), ("bot", "apple!")] and ready(d),
                 "a reply that used the history")

        browser.find_element(By.ID, "reset").click()
        wait_for(browser, lambda d: messages(d) == [("note", "Conversation reset: a fresh start.")] and ready(d),
                 "the reset")
        assert server.turns(conversation) == []

        Select(browser.find_element(By.ID, "persona")).select_by_value("wordchat")
        wait_for(browser, lambda d: messages(d)[-1] == ("note", "Now talking to wordchat.") and ready(d),
                 "the persona switch")
        assert browser.find_element(By.ID, "persona-description").text == "word game, chat format"
        assert server.persona(conversation) == "wordchat"
        send(browser, "the word is dragon")
        wait_for(browser, lambda d: messages(d)[-1] == ("bot", "dragon!") and ready(d), "the wordchat reply")
        screenshot(browser, "web_page_desktop.png")

        browser.refresh()
        wait_for(browser, lambda d: messages(d) == [("user", "the word is dragon"), ("bot", "dragon!")] and ready(d),
                 "the history after a second reload")
        assert Select(browser.find_element(By.ID, "persona")).first_selected_option.get_attribute("value") == "wordchat"
        assert server.turns(conversation) == [("user", "the word is dragon"), ("bot", "dragon!")]

        # A longer reply grows as it is generated, a screened sentence at a time.
        browser.find_element(By.ID, "reset").click()
        wait_for(browser, lambda d: messages(d) == [("note", "Conversation reset: a fresh start.")] and ready(d),
                 "the second reset")
        Select(browser.find_element(By.ID, "persona")).select_by_value("traps")
        wait_for(browser, lambda d: messages(d)[-1] == ("note", "Now talking to traps.") and ready(d), "the switch")
        browser.execute_script(RECORD_BOT_TEXTS)
        send(browser, PROMPT)
        wait_for(browser, lambda d: messages(d)[-1] == ("bot", TRAPS) and ready(d), "the long reply")
        shown = browser.execute_script("return window.botTexts")
        assert len(set(shown)) == 4 and all(TRAPS.startswith(text) for text in shown), shown

        # Forget me: after a confirmation, everything this browser wrote is deleted on the server.
        browser.find_element(By.ID, "forget").click()
        browser.switch_to.alert.accept()
        wait_for(browser, lambda d: messages(d) == [("note", "Forgotten: 2 message(s) deleted from the server.")]
                 and ready(d), "forget me")
        assert server.turns(conversation) == []


@pytest.mark.timeout(120, func_only=True)
def test_chat_page_on_a_phone_shows_problems_clearly(config, browser):
    browser.set_window_size(390, 844)
    with ServerThread(config) as server:
        browser.get(server.url)
        wait_for(browser, ready, "the page to load")
        conversation = browser.execute_script("return localStorage.getItem('ttt.conversation')")
        layout = browser.execute_script(
            "const box = document.getElementById('composer').getBoundingClientRect();"
            "return [document.documentElement.scrollWidth, window.innerWidth, box.bottom, window.innerHeight];"
        )
        scroll_width, width, composer_bottom, height = layout
        assert scroll_width <= width and composer_bottom <= height, layout  # no sideways scrolling, input in view

        Select(browser.find_element(By.ID, "persona")).select_by_value("missing")
        status = browser.find_element(By.ID, "status")
        wait_for(browser, lambda d: "has not been trained yet" in status.text and ready(d), "the persona error")
        assert Select(browser.find_element(By.ID, "persona")).first_selected_option.get_attribute("value") == "words"
        assert server.persona(conversation) is None

        long_text = "word " * 20
        send(browser, long_text)
        wait_for(browser, lambda d: messages(d)[-1][0] == "bot error" and ready(d), "the rejection")
        assert messages(browser)[-2] == ("user unsent", long_text.strip())
        assert "under 60 characters" in messages(browser)[-1][1]
        assert browser.find_element(By.ID, "input").get_attribute("value") == long_text.strip()  # kept for editing
        assert server.turns(conversation) == []

        browser.find_element(By.ID, "input").clear()
        send(browser, "the word is lemon")
        wait_for(browser, lambda d: messages(d)[-1] == ("bot", "lemon!") and ready(d), "the reply")
        screenshot(browser, "web_page_phone.png")


@pytest.mark.timeout(120, func_only=True)
def test_chat_page_asks_for_the_api_key(config, browser):
    with ServerThread(config, {"TTT_API_KEY": API_KEY}) as server:
        browser.get(server.url)
        key_form = browser.find_element(By.ID, "key-form")
        wait_for(browser, lambda d: key_form.is_displayed(), "the key prompt")
        assert not browser.find_element(By.ID, "composer").is_displayed()

        key_box = browser.find_element(By.ID, "api-key")
        key_box.send_keys("not-the-key", Keys.ENTER)
        status = browser.find_element(By.ID, "status")
        wait_for(browser, lambda d: "not accepted" in status.text and key_form.is_displayed(), "the refusal")

        key_box.send_keys(API_KEY, Keys.ENTER)
        wait_for(browser, ready, "the unlocked page")
        assert not key_form.is_displayed()
        send(browser, "the word is cloud")
        wait_for(browser, lambda d: messages(d)[-1] == ("bot", "cloud!") and ready(d), "the reply")
        conversation = browser.execute_script("return localStorage.getItem('ttt.conversation')")
        assert server.turns(conversation) == [("user", "the word is cloud"), ("bot", "cloud!")]

