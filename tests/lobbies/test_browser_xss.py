"""Script injection through what people type, in real Chromium against a
production server: someone named with a script payload chats a payload; the
others in the room, and staff in the admin, see the text as typed and no script runs.

The API no longer takes '<' or '>' in a new display name, but names made
before that rule, and bots' names (typed by staff), still reach the pages, so
the payload's session is made by the service and handed to the page the way
the landing page would have stored it.
"""

import json
from collections.abc import Callable

from django.contrib.auth import get_user_model
from playwright.sync_api import Browser, Page, expect

from lobbies import services
from tests.conftest import LiveServer, chromium

PAYLOAD = "<img src=x onerror=window.__xss=1>"
CHAT_PAYLOAD = "<script>window.__xss=2</script><img src=y onerror=window.__xss=3>"
# What the payloads would add to the page if they were taken for markup.
INJECTED_ELEMENTS = "img[src=x], img[src=y], script"
WAIT_MS = 20_000


def enter_room(browser: Browser, server: LiveServer, lobby: str, name: str = "", session: dict | None = None) -> Page:
    """A person of their own (a fresh browser context) on the room page: named
    `name` on the page, or already holding `session` in the tab as session.js keeps it."""
    context = browser.new_context()
    if session is not None:
        context.add_init_script(f"sessionStorage.setItem('voicebot.session', {json.dumps(json.dumps(session))})")
    page = context.new_page()
    page.goto(f"{server.http}/lobby/{lobby}/")
    if session is None:
        page.fill("#name-input", name)
        page.locator("#name-form").get_by_role("button", name="Join").click()
    return page


def injected(page: Page) -> object:
    return page.evaluate("window.__xss")


def test_names_and_chat_show_as_text_in_the_room_and_the_admin(
    start_production_server: Callable[..., LiveServer],
) -> None:
    get_user_model().objects.create_superuser("root", "root@example.com", "root-password")
    creator, _ = services.session_create(name="Owner")
    hostile, token = services.session_create(name=PAYLOAD)
    mallory_session = {"id": str(hostile.id), "name": hostile.name, "token": token}
    services.lobby_create(name="xss-vault", private=False, max_participants=4, created_by=creator, password="secret")
    server = start_production_server()

    with chromium() as browser:
        mallory = enter_room(browser, server, "xss-room", session=mallory_session)
        mallory.locator("#chat-input:enabled").wait_for(timeout=WAIT_MS)
        bob = enter_room(browser, server, "xss-room", "Bob")
        bob.locator("#chat-input:enabled").wait_for(timeout=WAIT_MS)

        mallory.fill("#chat-input", CHAT_PAYLOAD)
        mallory.press("#chat-input", "Enter")

        expect(bob.locator("#chat-log .chat-text")).to_have_text(CHAT_PAYLOAD, timeout=WAIT_MS)
        expect(bob.locator("#chat-log .chat-name")).to_have_text(PAYLOAD)
        expect(bob.locator("#participants")).to_contain_text(PAYLOAD)
        room_elements = sum(bob.locator(area).locator(INJECTED_ELEMENTS).count() for area in ("#chat-log", "#participants"))
        room_injected = [injected(bob), injected(mallory)]

        # A wrong lobby password puts Mallory's name in the audit log.
        vault = enter_room(browser, server, "xss-vault", session=mallory_session)
        vault.fill("#password-input", "guess")
        vault.locator("#password-form").get_by_role("button", name="Join").click()
        expect(vault.locator("#password-message")).to_be_visible(timeout=WAIT_MS)

        staff = browser.new_context().new_page()
        staff.goto(f"{server.http}/admin/login/")
        staff.fill("#id_username", "root")
        staff.fill("#id_password", "root-password")
        staff.click("input[type=submit]")
        staff.locator("#content").wait_for(timeout=WAIT_MS)
        admin_pages = {}
        for path in ("/admin/lobbies/session/", "/admin/lobbies/membership/", "/admin/monitoring/auditevent/"):
            staff.goto(f"{server.http}{path}")
            results = staff.locator("#result_list")
            expect(results).to_contain_text(PAYLOAD, timeout=WAIT_MS)
            admin_pages[path] = (results.locator(INJECTED_ELEMENTS).count(), injected(staff))

    assert room_elements == 0
    assert room_injected == [None, None]
    assert admin_pages == {path: (0, None) for path in admin_pages}, admin_pages
