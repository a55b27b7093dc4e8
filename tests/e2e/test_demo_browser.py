"""The demo page in a real browser: Debian's chromium, headless, driven by
Python playwright (the system chromium; no ``playwright install``), against
a real server started with ``--demo``.

Two users in two browser contexts (each its own profile: storage, cookies)
sign in, chat one to one and in a session (bob joins it anonymously); bob's
page closes, alice sends to him while he is away, bob's page opens again and
shows exactly what he missed, nothing lost or twice.  Screenshots go to
``test-artifacts/demo-browser/`` (ignored by git; the path is printed).
"""

from __future__ import annotations

import os
import re
import shutil

from playwright.sync_api import Locator, Page, expect, sync_playwright  # the test extra (pip install -e '.[test]')
from twisted.trial import unittest

from tests.support import ROOT, ServerProcess

#: Debian's chromium (``./dev test`` installs it).
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.access(p, os.X_OK)),
                None)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.path.join(ROOT, "test-artifacts", "demo-browser")

#: Milliseconds any one expectation may wait (the page polls; nothing sleeps).
WAIT_MS = 20_000


def sign_in(page: Page, server: ServerProcess, name: str) -> None:
    """Open the demo and sign in as ``name``; returns once the client is
    connected, synced and in the lobby."""
    page.goto(server.base_url + "/demo/", timeout=WAIT_MS)
    page.fill("#name", name)
    page.click("#sign-in-button")
    wait_ready(page)


def wait_ready(page: Page) -> None:
    """Connected, synced, and in the lobby (who is online is known)."""
    expect(page.locator("#status")).to_have_attribute("data-state", "ready", timeout=WAIT_MS)
    expect(page.locator("#chat")).to_have_attribute("data-lobby", "joined", timeout=WAIT_MS)


def person(page: Page, name: str) -> Locator:
    return page.locator(f'#people li[data-name="{name}"]')


def say(page: Page, text: str) -> None:
    """Send ``text`` in the open conversation and wait for its ``accepted``."""
    page.fill("#text", text)
    page.click("#send")
    mine = page.locator("#messages li.mine", has_text=text)
    expect(mine).to_have_count(1, timeout=WAIT_MS)
    expect(mine.locator(".meta")).to_contain_text(re.compile("delivered|stored"), timeout=WAIT_MS)


def texts(page: Page) -> list[str]:
    """The texts of the open conversation, in order."""
    return page.locator('#messages [data-test="message-text"]').all_text_contents()


def shoot(page: Page, name: str) -> None:
    path = os.path.join(ARTIFACTS, f"{name}.png")
    page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")


class DemoBrowserTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        if CHROMIUM is None:
            raise unittest.SkipTest("no chromium found at /usr/bin/chromium or on PATH (apt-get install chromium)")
        os.makedirs(ARTIFACTS, exist_ok=True)
        print(f"demo browser screenshots: {ARTIFACTS}")
        self.server = ServerProcess(args=("--demo",)).start()
        self.addCleanup(self.server.stop)

    def test_two_users_chat_and_one_gets_what_it_missed(self) -> None:
        page_errors: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                alice_context = browser.new_context(viewport={"width": 1100, "height": 700})
                bob_context = browser.new_context(viewport={"width": 1100, "height": 700})
                alice = alice_context.new_page()
                bob = bob_context.new_page()
                for page in (alice, bob):
                    page.on("pageerror", lambda error: page_errors.append(str(error)))
                sign_in(alice, self.server, "alice")
                sign_in(bob, self.server, "bob")

                # one to one: each sees the other online, and they talk
                expect(person(alice, "bob")).to_have_attribute("data-online", "true", timeout=WAIT_MS)
                person(alice, "bob").click()
                say(alice, "hello bob")
                expect(person(bob, "alice").locator('[data-test="unread"]')).to_have_text("1", timeout=WAIT_MS)
                person(bob, "alice").click()
                expect(bob.locator("#messages li", has_text="hello bob")).to_have_count(1, timeout=WAIT_MS)
                say(bob, "hi alice")
                expect(alice.locator("#messages li", has_text="hi alice")).to_have_count(1, timeout=WAIT_MS)

                # a session: alice creates it, bob joins it anonymously
                alice.fill("#session-id", "room-1")
                alice.click("#create-session")
                expect(alice.locator("#conversation-title")).to_have_text("Session room-1", timeout=WAIT_MS)
                bob.fill("#session-id", "room-1")
                bob.check("#session-anonymous")
                bob.click("#join-session")
                expect(bob.locator("#conversation-note")).to_contain_text("You are anonymous here", timeout=WAIT_MS)
                # alice's open session counts the member who just joined
                expect(alice.locator("#conversation-note")).to_contain_text("Members: 2", timeout=WAIT_MS)
                say(bob, "an anonymous hello")
                from_bob = alice.locator("#messages li", has_text="an anonymous hello")
                expect(from_bob).to_have_count(1, timeout=WAIT_MS)
                alias = from_bob.get_attribute("data-from") or ""
                self.assertTrue(alias.startswith("anon-"), alias)  # alice never learns it is bob
                say(alice, "welcome to room-1")
                expect(bob.locator("#messages li", has_text="welcome to room-1")).to_have_count(1, timeout=WAIT_MS)
                shoot(alice, "1-alice-session")
                shoot(bob, "2-bob-session-anonymous")

                # bob leaves (his last open conversation: alice); alice sees him go and writes anyway
                person(bob, "alice").click()
                expect(bob.locator("#conversation-title")).to_have_text("Chat with alice", timeout=WAIT_MS)
                bob.close()
                expect(person(alice, "bob")).to_have_attribute("data-online", "false", timeout=WAIT_MS)
                alice.locator('#sessions li[data-session="room-1"]').click()
                say(alice, "missed in room-1")
                person(alice, "bob").click()
                say(alice, "are you there?")
                say(alice, "call me when you are back")
                for text in ("are you there?", "call me when you are back"):  # kept for bob: nobody online got it
                    meta = alice.locator("#messages li.mine", has_text=text).locator(".meta")
                    expect(meta).to_contain_text("stored", timeout=WAIT_MS)
                shoot(alice, "3-alice-writes-to-offline-bob")

                # bob comes back in a new tab: the same device, synced
                bob = bob_context.new_page()
                bob.on("pageerror", lambda error: page_errors.append(str(error)))
                bob.goto(self.server.base_url + "/demo/", timeout=WAIT_MS)
                wait_ready(bob)
                expect(bob.locator("#conversation-title")).to_have_text("Chat with alice", timeout=WAIT_MS)
                expected = ["hello bob", "hi alice", "are you there?", "call me when you are back"]
                expect(bob.locator('#messages [data-test="message-text"]')).to_have_text(expected, timeout=WAIT_MS)
                self.assertEqual(texts(bob), expected)  # nothing lost, nothing twice
                expect(person(alice, "bob")).to_have_attribute("data-online", "true", timeout=WAIT_MS)
                shoot(bob, "4-bob-back-with-what-he-missed")
                bob.locator('#sessions li[data-session="room-1"]').click()
                expect(bob.locator('#messages [data-test="message-text"]')).to_have_text(
                    ["an anonymous hello", "welcome to room-1", "missed in room-1"], timeout=WAIT_MS)
                keys = bob.locator("#messages li").evaluate_all("items => items.map(i => i.dataset.key)")
                self.assertEqual(len(keys), len(set(keys)))
                shoot(bob, "5-bob-back-in-the-session")
            finally:
                browser.close()
        self.assertEqual(page_errors, [])
