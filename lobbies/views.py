import json
import re
import unicodedata
from functools import wraps
from typing import Any

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt, ensure_csrf_cookie
from django.views.decorators.http import require_GET

from lobbies import ratelimit, selectors, services
from lobbies.models import LOBBY_NAME_PATTERN, LOBBY_PASSWORD_MAX_LENGTH, Session
from monitoring.services import audit_record

MAX_NAME_LENGTH = 64
MAX_BODY_BYTES = 16 * 1024


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"code": code, "message": message}, status=status)


def api_view(*methods: str):
    """A JSON API view answering `methods`, with every error as JSON.

    CSRF is checked by the view itself (see `authenticate`), because requests
    that carry a bearer token need none.
    """

    def decorator(view):
        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                response = error_response(405, "method_not_allowed", f"Use {' or '.join(methods)}.")
                response["Allow"] = ", ".join(methods)
                return response
            try:
                return view(request, *args, **kwargs)
            except ApiError as error:
                response = error_response(error.status, error.code, error.message)
                for name, value in error.headers.items():
                    response[name] = value
                return response

        return wrapper

    return decorator


def enforce_rate_limit(limit: ratelimit.Limit, key: str | None) -> None:
    """Counts an attempt by `key`; 429 when it is over the limit."""
    retry_after = ratelimit.hit(limit, key)
    if retry_after is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"{limit.refusal}; try again in {retry_after} s.",
            headers={"Retry-After": str(retry_after)},
        )


def json_body(request: HttpRequest) -> dict[str, Any]:
    # Only JSON: a cross-site HTML form cannot send it without a CORS preflight.
    if request.content_type != "application/json":
        raise ApiError(415, "bad_content_type", "Send the body as application/json.")
    if len(request.body) > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"The body may be at most {MAX_BODY_BYTES} bytes.")
    try:
        data = json.loads(request.body)
    except ValueError:
        raise ApiError(400, "bad_json", "The body is not valid JSON.")
    except RecursionError:
        raise ApiError(400, "bad_json", "The body is nested too deeply.")
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "The body must be a JSON object.")
    return data


def bearer_token(request: HttpRequest) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def authenticate(request: HttpRequest, *, required: bool) -> Session | None:
    """The session behind a bearer token or, with Django's CSRF check, the cookie."""
    token = bearer_token(request)
    ip = ratelimit.client_ip(request)
    if not token:
        token = request.COOKIES.get(settings.VOICEBOT_TOKEN_COOKIE, "")
        if token and request.method not in ("GET", "HEAD", "OPTIONS"):
            rejection = CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})
            if rejection is not None:
                audit_record(action="csrf_rejected", ip=ip, detail={"path": request.path})
                raise ApiError(403, "csrf_failed", "Cookie-authenticated requests need a CSRF token.")
    session = selectors.session_for_token(token)
    if session is None and required:
        # Only here: the landing page lists lobbies with whatever token its tab kept, stale or not.
        if token:
            audit_record(action="token_rejected", ip=ip, detail={"path": request.path})
        raise ApiError(401, "unauthenticated", "Create a session first, or send its token as a bearer token.")
    return session


# Letters (not spaces, so split() keeps them) that show as nothing: a name of
# them looks empty, and "Bob" plus one looks like Bob.
BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def clean_display_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError(400, "bad_field", "'name' must be a string.")
    name = " ".join(value.split())
    if not name:
        raise ApiError(400, "missing_field", "'name' must not be empty.")
    if len(name) > MAX_NAME_LENGTH:
        raise ApiError(400, "bad_field", f"'name' may be at most {MAX_NAME_LENGTH} characters.")
    # Names are shown to everyone in a room: nothing that hides or reorders
    # text, and nothing a careless page could take for markup.
    for char in name:
        category = unicodedata.category(char)
        if category == "Cc":
            raise ApiError(400, "bad_field", "'name' must not contain control characters.")
        if category == "Cf":
            raise ApiError(
                400, "bad_field", "'name' must not contain invisible formatting characters (bidi or zero-width)."
            )
        if category.startswith("C"):
            raise ApiError(400, "bad_field", "'name' must not contain surrogate, private-use or unassigned code points.")
        if char in "<>":
            raise ApiError(400, "bad_field", "'name' must not contain '<' or '>'.")
        if char in BLANK_LETTERS:
            raise ApiError(400, "bad_field", "'name' must not contain letters that show as blank space (fillers).")
    return name


def set_token_cookie(response: HttpResponse, token: str) -> None:
    response.set_cookie(
        settings.VOICEBOT_TOKEN_COOKIE,
        token,
        max_age=365 * 24 * 3600,
        httponly=True,
        samesite="Lax",
        secure=settings.VOICEBOT_COOKIE_SECURE,
    )


def session_json(session: Session) -> dict[str, Any]:
    return {"id": str(session.id), "name": session.name}


@api_view("POST")
def session_create(request: HttpRequest) -> HttpResponse:
    # Every attempt counts, so the limit also bounds probing with bad requests.
    enforce_rate_limit(ratelimit.SESSIONS, ratelimit.client_key(request))
    data = json_body(request)
    if "name" not in data:
        raise ApiError(400, "missing_field", "'name' is required.")
    session, token = services.session_create(name=clean_display_name(data["name"]))
    response = JsonResponse({**session_json(session), "token": token}, status=201)
    set_token_cookie(response, token)
    return response


@api_view("POST")
def session_resume(request: HttpRequest) -> HttpResponse:
    """Make the bearer token's session the one this browser's cookie names.

    The room page keeps its token per tab, so two tabs can be two people;
    it calls this before connecting so the WebSocket carries its own identity.
    """
    token = bearer_token(request)
    session = selectors.session_for_token(token)
    if session is None:
        raise ApiError(401, "unauthenticated", "Unknown or missing bearer token.")
    response = JsonResponse(session_json(session))
    set_token_cookie(response, token)
    return response


@api_view("GET", "POST")
def lobby_collection(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        limit = list_limit(request)
        viewer = authenticate(request, required=False)
        return JsonResponse({"lobbies": selectors.lobby_list(viewer=viewer)[:limit]})

    creator = authenticate(request, required=True)
    enforce_rate_limit(ratelimit.LOBBIES, str(creator.id))
    data = json_body(request)
    name = data.get("name")
    if name is None:
        raise ApiError(400, "missing_field", "'name' is required.")
    if not isinstance(name, str) or not re.match(LOBBY_NAME_PATTERN, name):
        raise ApiError(400, "bad_field", "'name' must be 1-64 letters, digits, '-' or '_'.")
    private = data.get("private", False)
    if not isinstance(private, bool):
        raise ApiError(400, "bad_field", "'private' must be true or false.")
    max_participants = data.get("max_participants", settings.LOBBY_DEFAULT_MAX_PARTICIPANTS)
    limit = settings.LOBBY_MAX_PARTICIPANTS_LIMIT
    if type(max_participants) is not int or not 1 <= max_participants <= limit:
        raise ApiError(400, "bad_field", f"'max_participants' must be a whole number from 1 to {limit}.")
    password = data.get("password")
    if "password" in data and (
        not isinstance(password, str)
        or not 1 <= len(password) <= LOBBY_PASSWORD_MAX_LENGTH
        or not is_unicode(password)
    ):
        raise ApiError(400, "bad_field", f"'password' must be 1 to {LOBBY_PASSWORD_MAX_LENGTH} characters of text.")
    try:
        lobby = services.lobby_create(
            name=name, private=private, max_participants=max_participants, created_by=creator, password=password
        )
    except services.LobbyNameTaken:
        raise ApiError(409, "name_taken", f"A lobby named {name!r} already exists.")
    return JsonResponse(selectors.lobby_summary(lobby, participant_count=0), status=201)


def list_limit(request: HttpRequest) -> int:
    """`?limit=`: how many lobbies to list, at most LOBBY_LIST_LIMIT (also the default)."""
    most = settings.LOBBY_LIST_LIMIT
    raw = request.GET.get("limit")
    if raw is None:
        return most
    digits = raw.lstrip("0")
    if not (raw.isascii() and raw.isdigit() and digits):
        raise ApiError(400, "bad_field", "'limit' must be a whole number from 1 up.")
    # A long number is over the cap whatever it is, and is not converted.
    return most if len(digits) > len(str(most)) else min(int(digits), most)


def is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (JSON's "\\ud800"), which is no text."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@api_view("GET")
def lobby_detail(request: HttpRequest, name: str) -> HttpResponse:
    # A name no lobby can have is not looked up (the database refuses some, such as NUL).
    lobby = None
    if re.match(LOBBY_NAME_PATTERN, name):
        lobby = selectors.lobby_detail(name=name, password=request.headers.get("X-Lobby-Password", ""))
    if lobby is None:
        raise ApiError(404, "not_found", "No lobby has that name.")
    return JsonResponse(lobby)


@require_GET
@ensure_csrf_cookie
def index(request: HttpRequest) -> HttpResponse:
    context = {
        "default_max_participants": settings.LOBBY_DEFAULT_MAX_PARTICIPANTS,
        "max_participants_limit": settings.LOBBY_MAX_PARTICIPANTS_LIMIT,
    }
    return render(request, "lobbies/index.html", context)


@require_GET
@ensure_csrf_cookie
def room(request: HttpRequest, name: str) -> HttpResponse:
    if not re.match(LOBBY_NAME_PATTERN, name):
        raise Http404("No lobby can have that name.")
    return render(request, "lobbies/room.html", {"lobby_name": name})
