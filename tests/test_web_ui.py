"""The web UI in a real browser: Debian's chromium, headless, driven by Playwright, against ``hubctl --dev
serve`` subprocesses. Two browser contexts are two users chatting through the page (typing indicator,
message, read receipt, unread count, presence, history after a reload); the dashboard shows the live
connection count, and asks for an admin token where the browser's address is not an admin one.

Screenshots of each page are saved under $WEB_UI_SCREENSHOTS (docs/screenshots in the repository holds
the committed ones: ``WEB_UI_SCREENSHOTS=docs/screenshots python3 -m pytest tests/test_web_ui.py``), else
under the test's tmp_path.

Every wait is Playwright's own (expect / wait_for with a timeout); nothing sleeps.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.helpers import mint

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Generous: a loaded 2-core box runs a hub, two browser contexts and the test at once.
WAIT_MS = 20_000
# What the dashboard shows before a figure is known (an en dash).
NO_VALUE = "\u2013"

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the test extra installs it
    async_playwright = None

pytestmark = [
    pytest.mark.skipif(async_playwright is None, reason="playwright is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
                       reason=f"chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run does)"),
]


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    configured = os.environ.get("WEB_UI_SCREENSHOTS")
    target = Path(configured) if configured else tmp_path / "screenshots"
    if not target.is_absolute():
        target = ROOT / target
    target.mkdir(parents=True, exist_ok=True)
    return target


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert async_playwright is not None
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            # --no-sandbox: CI runs as root, where chromium refuses its sandbox.
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield launched
        finally:
            await launched.close()


class PageErrors:
    """Uncaught exceptions and console errors of the pages under test: the test fails on any."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def watch(self, page: Page, who: str) -> Page:
        page.on("pageerror", lambda error: self.seen.append(f"{who}: {error}"))
        page.on("console", lambda message: self.seen.append(f"{who}: console {message.text}")
                if message.type == "error" else None)
        page.set_default_timeout(WAIT_MS)
        return page


async def new_page(browser: Browser, errors: PageErrors, who: str) -> Page:
    context = await browser.new_context(viewport={"width": 1180, "height": 720}, locale="en-US",
                                        timezone_id="UTC")
    return errors.watch(await context.new_page(), who)


async def dev_login(page: Page, base: str, user: str) -> None:
    await page.goto(f"{base}/ui/")
    await page.locator("#login-user").fill(user)
    await page.get_by_role("button", name="Log in (dev)").click()
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "open", timeout=WAIT_MS)
    await expect(page.locator("#me")).to_have_text(f"Signed in as {user}")


def room_button(page: Page, room: str) -> Any:
    return page.locator(f'#room-list button[data-room="{room}"]')


@pytest.mark.timeout(180)
async def test_two_users_chat_through_the_page(hub_processes: Any, pg_schema: str, browser: Browser,
                                               screenshots: Path) -> None:
    """Alice (101) and Bob (102) log in with dev tokens in two browser contexts: each sees the other online,
    Alice sees Bob typing, Bob's message arrives, Alice's page marks it read and Bob sees "Read by 101"; a
    message in a room Alice is not viewing shows as unread until she opens it; after a reload Alice's page
    shows the history; the dashboard counts the two connections."""
    hub = await hub_processes(HUB_SERVER_DEV_LOGIN="true", HUB_POSTGRES_SCHEMA=pg_schema)
    base = f"http://127.0.0.1:{hub.port}"
    errors = PageErrors()
    alice = await new_page(browser, errors, "alice")
    bob = await new_page(browser, errors, "bob")

    await alice.goto(f"{base}/ui/")
    await expect(alice.get_by_role("heading", name="Log in")).to_be_visible()
    await alice.screenshot(path=str(screenshots / "login.png"))

    # A user with no rooms lands in channel_general.
    await dev_login(alice, base, "101")
    await dev_login(bob, base, "102")
    for page in (alice, bob):
        await expect(page.locator("#room-title")).to_have_text("channel_general")
    await expect(alice.locator('#members li[data-user="102"]')).to_have_attribute("data-status", "online")
    await expect(bob.locator('#members li[data-user="101"]')).to_have_attribute("data-status", "online")

    # Typing, then the message, then the read receipt (Alice's page has the room open: it marks it read).
    await bob.locator("#message-input").press_sequentially("Hello Alice, the parts ship today")
    await expect(alice.locator("#typing")).to_have_text("102 is typing…")
    await bob.locator("#message-input").press("Enter")
    from_bob = alice.locator('#messages li.message[data-sender="102"] .content')
    await expect(from_bob).to_have_text("Hello Alice, the parts ship today")
    await expect(alice.locator("#typing")).to_have_text("")
    await expect(bob.locator("#messages li.message.mine[data-id] .receipt")).to_have_text("Read by 101")

    await alice.locator("#message-input").fill("Great, thanks!")
    await alice.get_by_role("button", name="Send").click()
    await expect(bob.locator('#messages li.message[data-sender="101"] .content')).to_have_text("Great, thanks!")
    await expect(alice.locator("#messages li.message.mine[data-id] .receipt")).to_have_text("Read by 102")

    # Unread: Bob writes in a room Alice has joined but is not looking at.
    for page in (alice, bob):
        await page.locator("#join-room").fill("channel_parts")
        await page.get_by_role("button", name="Join").click()
        await expect(page.locator("#room-title")).to_have_text("channel_parts")
    await room_button(alice, "channel_general").click()
    await expect(alice.locator("#room-title")).to_have_text("channel_general")
    await bob.locator("#message-input").fill("Batch 7 passed inspection")
    await bob.locator("#message-input").press("Enter")
    await expect(room_button(alice, "channel_parts").locator(".unread")).to_have_text("1")
    await bob.locator("#message-input").fill("Photos follow")
    await bob.locator("#message-input").press("Enter")
    await expect(room_button(alice, "channel_parts").locator(".unread")).to_have_text("2")
    await expect(bob.locator("#messages li.message.mine[data-id]")).to_have_count(2)
    await expect(bob.locator("#messages li.message.mine .receipt.read")).to_have_count(0)
    await bob.locator("#message-input").press_sequentially("Anything else")  # typing, for the screenshot
    await expect(alice.locator("#typing")).to_have_text("")  # not in the room Alice is viewing
    await alice.screenshot(path=str(screenshots / "chat.png"))
    await room_button(alice, "channel_parts").click()
    await expect(room_button(alice, "channel_parts").locator(".unread")).to_have_count(0)
    # Typing goes on (a start is re-sent every 3 s of typing, within the hub's 6 s indicator lifetime).
    await bob.locator("#message-input").press_sequentially("?")
    await expect(alice.locator("#typing")).to_have_text("102 is typing…")
    await alice.screenshot(path=str(screenshots / "chat-typing.png"))
    await expect(bob.locator("#messages li.message.mine .receipt.read")).to_have_count(2)
    await bob.screenshot(path=str(screenshots / "chat-receipts.png"))

    # A reload keeps the session (the token is in sessionStorage) and shows the history from the hub.
    await alice.reload()
    await expect(alice.locator("#conn-state")).to_have_attribute("data-state", "open")
    await room_button(alice, "channel_general").click()
    await expect(alice.locator('#messages li.message[data-sender="102"] .content')).to_have_text(
        "Hello Alice, the parts ship today")
    await expect(alice.locator("#messages li.message.mine .content")).to_have_text("Great, thanks!")
    await expect(room_button(alice, "channel_parts").locator(".unread")).to_have_count(0)

    # The dashboard (admin by address: the browser is on loopback) counts Alice's and Bob's connections.
    dashboard = errors.watch(await alice.context.new_page(), "dashboard")
    await dashboard.goto(f"{base}/ui/dashboard")
    await expect(dashboard.locator("#conn-count")).to_have_text("2")
    await expect(dashboard.locator("#conn-users")).to_contain_text("2 user(s)")
    await expect(dashboard.locator("#nodes-alive")).to_have_text("1")
    await expect(dashboard.locator("#types-table")).to_contain_text("channel")
    await expect(dashboard.locator("#auth")).to_be_hidden()
    # No archiver runs here: every message is still only in Redis.
    await expect(dashboard.locator("#pg-summary")).to_contain_text("0 archived messages")
    # Two /metrics samples make the first rate; messages sent after it show in the next one.
    await expect(dashboard.locator("#rate-in")).not_to_have_text(NO_VALUE)
    for text in ("Crates are on the truck", "ETA 14:00", "Invoice attached"):
        await bob.locator("#message-input").fill(text)
        await bob.locator("#message-input").press("Enter")
    await expect(dashboard.locator("#rate-in")).not_to_have_text("0.0")
    await dashboard.screenshot(path=str(screenshots / "dashboard.png"), full_page=True)
    assert errors.seen == []


@pytest.mark.timeout(120)
async def test_dashboard_asks_for_an_admin_token_off_the_admin_list(hub_processes: Any, browser: Browser,
                                                                    screenshots: Path) -> None:
    """With no admin address (server.admin_ips empty) the dashboard's admin requests are refused: it shows
    the token form; a dev admin token then fills it in. On a hub without dev mode the dev login is refused,
    a pasted token with a bad signature is refused with the hub's reason, and a good one logs in."""
    hub = await hub_processes(HUB_SERVER_DEV_LOGIN="true", HUB_SERVER_ADMIN_IPS="")
    base = f"http://127.0.0.1:{hub.port}"
    errors = PageErrors()
    page = await new_page(browser, errors, "ops")
    # The refused admin requests are expected console errors (403); everything else must be clean.
    await page.goto(f"{base}/ui/dashboard")
    await expect(page.locator("#auth")).to_be_visible()
    await expect(page.locator("#conn-count")).to_have_text(NO_VALUE)
    await page.get_by_role("button", name="Dev hub: mint an admin token").click()
    await expect(page.locator("#auth")).to_be_hidden()
    await expect(page.locator("#conn-count")).to_have_text("0")
    await expect(page.locator("#auth-mode")).to_have_text("admin token")
    assert all("403" in seen for seen in errors.seen), errors.seen

    plain = await hub_processes()  # no dev login
    await page.goto(f"http://127.0.0.1:{plain.port}/ui/")
    await page.locator("#login-user").fill("101")
    await page.get_by_role("button", name="Log in (dev)").click()
    await expect(page.locator("#login-error")).to_contain_text("dev login is off")
    await page.locator("#login-token").fill(mint("103", secret="not-the-hub-secret-0123456789abcdef"))
    await page.get_by_role("button", name="Log in with token").click()
    await expect(page.locator("#login-error")).to_contain_text("The hub refused this token")
    await page.locator("#login-token").fill(mint("103"))
    await page.get_by_role("button", name="Log in with token").click()
    await expect(page.locator("#conn-state")).to_have_attribute("data-state", "open")
    await expect(page.locator("#me")).to_have_text("Signed in as 103")

