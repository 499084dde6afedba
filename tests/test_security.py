"""Production safety checks, security headers, cookie flags and CSRF, and a
Content-Security-Policy that the pages pass in a real browser."""

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from playwright.sync_api import Browser, Page

from lobbies.models import Lobby
from tests.conftest import LiveServer, Person, chromium, embedded_env
from tests.test_settings import load_settings

PRODUCTION = {"DATABASE_URL": "postgres://postgres@127.0.0.1:5432/voicebot", "DJANGO_SECRET_KEY": "a-real-secret"}
WAIT_MS = 20_000
# Collects every CSP violation the page reports, from before its first script runs.
REPORT_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (event) => {
  window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI} ${event.sourceFile}:${event.lineNumber}`);
});
"""


def refusal(tmp_path: Path, **env: str) -> str:
    result = load_settings({**embedded_env(tmp_path), **PRODUCTION, **env})
    assert result.returncode != 0, "the settings loaded"
    assert "django.core.exceptions.ImproperlyConfigured" in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_production_refuses_debug(tmp_path: Path) -> None:
    assert "DJANGO_DEBUG must be off when DATABASE_URL is set" in refusal(tmp_path, DJANGO_DEBUG="1")


@pytest.mark.parametrize("key", ["replace-with-a-long-random-value", "django-insecure-abc123", " changeme "])
def test_production_refuses_a_placeholder_secret_key(tmp_path: Path, key: str) -> None:
    assert "DJANGO_SECRET_KEY is a placeholder, not a secret" in refusal(tmp_path, DJANGO_SECRET_KEY=key)


@pytest.mark.parametrize("key", ["", "   "], ids=["empty", "blank"])
def test_production_refuses_an_empty_secret_key(tmp_path: Path, key: str) -> None:
    assert "DJANGO_SECRET_KEY must be set when DATABASE_URL is set" in refusal(tmp_path, DJANGO_SECRET_KEY=key)


@pytest.mark.parametrize("hosts", ["", " ", " , "], ids=["empty", "blank", "commas"])
def test_production_refuses_empty_allowed_hosts(tmp_path: Path, hosts: str) -> None:
    assert "DJANGO_ALLOWED_HOSTS is empty" in refusal(tmp_path, DJANGO_ALLOWED_HOSTS=hosts)


def test_the_embedded_default_keeps_its_developer_conveniences(tmp_path: Path) -> None:
    result = load_settings({**embedded_env(tmp_path), "DJANGO_DEBUG": "1", "DJANGO_ALLOWED_HOSTS": ""})

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["debug"] is True


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/", "/lobby/room/", "/api/lobbies/", "/admin/login/", "/healthz"])
def test_every_response_carries_the_security_headers(path: str) -> None:
    response = Client().get(path)

    assert response.status_code == 200
    assert response["Content-Security-Policy"] == settings.VOICEBOT_CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in response["Content-Security-Policy"]
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Referrer-Policy"] == "same-origin"
    assert response["X-Frame-Options"] == "DENY"
    assert response["Cross-Origin-Opener-Policy"] == "same-origin"
    # Plain HTTP, and HSTS is off unless VOICEBOT_HSTS_SECONDS is set.
    assert "Strict-Transport-Security" not in response


def fetch(server: LiveServer, path: str, *, body: dict | None = None, headers: dict[str, str] | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{server.http}{path}", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    return urllib.request.urlopen(request, timeout=10)


def cookie_attributes(response, name: str) -> set[str]:
    """The attributes of a Set-Cookie header, lower-cased, without the value and the dates."""
    for header in response.headers.get_all("Set-Cookie"):
        if header.startswith(f"{name}="):
            return {part.strip().split("=")[0].lower() + ("=" + part.split("=")[1].lower() if "samesite" in part.lower() else "")
                    for part in header.split(";")[1:]} - {"expires", "max-age", "path"}
    raise AssertionError(f"no {name} cookie in {response.headers.get_all('Set-Cookie')}")


def test_behind_https_cookies_are_secure_and_hsts_is_sent(start_production_server: Callable[..., LiveServer]) -> None:
    server = start_production_server(VOICEBOT_COOKIE_SECURE="1", VOICEBOT_HSTS_SECONDS="31536000")
    # nginx of docs/deploying.md tells uvicorn the request came over HTTPS.
    over_https = {"X-Forwarded-Proto": "https"}

    page = fetch(server, "/", headers=over_https)
    plain = fetch(server, "/")
    session = fetch(server, "/api/sessions/", body={"name": "Alice"}, headers=over_https)

    assert page.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert "Strict-Transport-Security" not in plain.headers
    assert cookie_attributes(page, "csrftoken") == {"secure", "httponly", "samesite=lax"}
    assert cookie_attributes(session, "voicebot_token") == {"secure", "httponly", "samesite=lax"}


def test_admin_login_cookie_is_secure_behind_https(start_production_server: Callable[..., LiveServer]) -> None:
    get_user_model().objects.create_superuser("root", "root@example.com", "root-password")
    server = start_production_server(VOICEBOT_COOKIE_SECURE="1")
    over_https = {"X-Forwarded-Proto": "https"}
    login_page = fetch(server, "/admin/login/", headers=over_https)
    csrf = next(
        header.split(";")[0].split("=", 1)[1]
        for header in login_page.headers.get_all("Set-Cookie")
        if header.startswith("csrftoken=")
    )
    form = urllib.parse.urlencode(
        {"username": "root", "password": "root-password", "csrfmiddlewaretoken": csrf, "next": "/admin/"}
    )
    request = urllib.request.Request(
        f"{server.http}/admin/login/",
        data=form.encode(),
        headers={**over_https, "Cookie": f"csrftoken={csrf}", "Origin": f"https://127.0.0.1:{server.port}"},
    )

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object) -> None:
            return None

    with pytest.raises(urllib.error.HTTPError) as redirect:
        urllib.request.build_opener(NoRedirect()).open(request, timeout=10)

    assert redirect.value.code == 302, redirect.value.read()[:300]
    assert cookie_attributes(redirect.value, "sessionid") == {"secure", "httponly", "samesite=lax"}


def test_over_plain_http_cookies_are_not_secure_so_they_still_work(start_production_server) -> None:
    server = start_production_server()

    session = fetch(server, "/api/sessions/", body={"name": "Alice"})

    assert cookie_attributes(session, "voicebot_token") == {"httponly", "samesite=lax"}


@pytest.mark.django_db(transaction=True)
def test_a_cookie_authenticated_post_from_another_site_is_refused(alice: Person) -> None:
    browser = Client(enforce_csrf_checks=True)
    browser.cookies["voicebot_token"] = alice.token

    forged = browser.post(
        "/api/lobbies/", {"name": "forged"}, content_type="application/json", HTTP_ORIGIN="https://evil.example"
    )
    without_token = browser.post("/api/lobbies/", {"name": "forged"}, content_type="application/json")

    for response in (forged, without_token):
        assert response.status_code == 403
        assert response.json() == {"code": "csrf_failed", "message": "Cookie-authenticated requests need a CSRF token."}
    assert not Lobby.objects.filter(name="forged").exists()


@pytest.mark.django_db(transaction=True)
def test_a_cookie_post_with_the_csrf_token_and_a_bearer_post_are_accepted(alice: Person) -> None:
    browser = Client(enforce_csrf_checks=True)
    browser.get("/")  # the page sets the CSRF cookie
    browser.cookies["voicebot_token"] = alice.token
    csrf = browser.cookies["csrftoken"].value

    with_cookie = browser.post(
        "/api/lobbies/", {"name": "by-cookie"}, content_type="application/json", HTTP_X_CSRFTOKEN=csrf
    )
    # A bearer token is not sent by the browser on its own, so it needs no CSRF token.
    with_bearer = Client(enforce_csrf_checks=True).post(
        "/api/lobbies/", {"name": "by-bearer"}, content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {alice.token}", HTTP_ORIGIN="https://elsewhere.example",
    )

    assert (with_cookie.status_code, with_bearer.status_code) == (201, 201)


def watched_page(browser: Browser, console: list[str]) -> Page:
    page = browser.new_page()
    page.add_init_script(REPORT_VIOLATIONS)
    page.on("console", lambda message: console.append(message.text))
    page.on("pageerror", lambda error: console.append(f"page error: {error}"))
    return page


def violations(page: Page) -> list[str]:
    return page.evaluate("window.__cspViolations")


def wait_until(page: Page, expression: str) -> None:
    """page.wait_for_function polls with eval, which the policy refuses (it has no 'unsafe-eval')."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"{expression} still false"
        page.wait_for_timeout(50)


def test_the_pages_run_under_the_policy_with_no_violation(start_production_server) -> None:
    get_user_model().objects.create_superuser("root", "root@example.com", "root-password")
    server = start_production_server()
    console: list[str] = []
    with chromium() as browser:
        page = watched_page(browser, console)

        page.goto(f"{server.http}/")
        page.locator("#lobby-list-status").wait_for(state="attached", timeout=WAIT_MS)
        landing = violations(page)

        page.goto(f"{server.http}/lobby/csp-room/")
        page.fill("#name-input", "Alice")
        page.locator("#name-form").get_by_role("button", name="Join").click()
        page.locator("#chat-input:enabled").wait_for(timeout=WAIT_MS)
        page.fill("#chat-input", "hello")
        page.press("#chat-input", "Enter")
        page.locator("#chat-log", has_text="hello").wait_for(timeout=WAIT_MS)
        room = violations(page)

        page.goto(f"{server.http}/admin/login/?next=/admin/dashboard/")
        page.fill("#id_username", "root")
        page.fill("#id_password", "root-password")
        page.click("input[type=submit]")
        page.locator("#rules").wait_for(timeout=WAIT_MS)
        page.locator(".chart").first.wait_for(timeout=WAIT_MS)
        dashboard = violations(page)

        admin_pages = {}
        for path in ("/admin/", "/admin/lobbies/session/", "/admin/monitoring/auditevent/", "/admin/lobbies/lobby/add/"):
            page.goto(f"{server.http}{path}")
            page.locator("#content").wait_for(timeout=WAIT_MS)
            admin_pages[path] = violations(page)

        reported = [line for line in console if "Content Security Policy" in line or "page error" in line]
        # The listener and the policy work: a script the page did not load from a file does not run.
        page.evaluate(
            "const script = document.createElement('script');"
            "script.textContent = 'window.__inline = 1';"
            "document.body.append(script)"
        )
        wait_until(page, "window.__cspViolations.length > 0")
        inline_ran = page.evaluate("window.__inline")

    assert landing == [] and room == [] and dashboard == [], (landing, room, dashboard)
    assert all(found == [] for found in admin_pages.values()), admin_pages
    assert reported == []
    assert inline_ran is None
