"""Per-request context (the request ID for logs and the response, the client's
address for the audit log, the request's span) and the Content-Security-Policy header."""

import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import Token

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils.decorators import sync_and_async_middleware
from django.utils.deprecation import MiddlewareMixin
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from lobbies.ratelimit import client_ip
from voicebot import logcontext, security
from voicebot.logcontext import DATABASE_UNAVAILABLE
from voicebot.tracing import header_carrier, tracer

REQUEST_ID_HEADER = "X-Request-ID"

# Seconds a client is told to wait before trying again.
DATABASE_RETRY_AFTER_SECONDS = 5

# One line per request, with its request ID: daphne's own access log is plain
# text on stdout and knows nothing of the context.
access_log = logging.getLogger("voicebot.access")
logger = logging.getLogger(__name__)


def _start_span(request: HttpRequest, request_id: str) -> trace.Span:
    # Join the caller's trace when it sent a traceparent header.
    parent = propagate.extract(header_carrier(request.headers))
    return tracer.start_span(
        request.method or "HTTP",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": request.method or "",
            # The path only: query strings may carry tokens or passwords.
            "url.path": request.path,
            "voicebot.request_id": request_id,
        },
    )


def _end_span(span: trace.Span, request: HttpRequest, response: HttpResponse) -> None:
    match = getattr(request, "resolver_match", None)
    if match is not None and match.route:
        route = "/" + match.route.lstrip("^").rstrip("$")
        span.set_attribute("http.route", route)
        span.update_name(f"{request.method} {route}")
    span.set_attribute("http.response.status_code", response.status_code)
    if response.status_code >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def _log_access(request: HttpRequest, response: HttpResponse) -> None:
    duration_ms = round((time.monotonic() - request._voicebot_started) * 1000, 1)  # type: ignore[attr-defined]
    # The path only: query strings may carry tokens or passwords.
    access_log.info(
        "%s %s %s",
        request.method,
        request.path,
        response.status_code,
        extra={
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": duration_ms,
        },
    )


@sync_and_async_middleware
def request_context_middleware(
    get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]],
) -> Callable:
    """Binds the request ID (the caller's X-Request-ID if acceptable, else a new
    one) for the request's logs, echoes it in the response, and traces the request.
    It also keeps the client's address for audit events (security.client_address).

    Under ASGI the binding is left in place when the middleware returns: Django
    runs each request in a task of its own (a sync chain's context is copied
    back to it), and logs 4xx/5xx responses ("Not Found: ...") only after the
    middleware has returned. A WSGI thread, or the test client's, serves one
    request after another, so there it is undone.
    """

    def begin(request: HttpRequest) -> tuple[str, tuple[Token, Token], trace.Span]:
        request._voicebot_started = time.monotonic()  # type: ignore[attr-defined]
        request_id = logcontext.request_id_from(request.headers.get(REQUEST_ID_HEADER))
        tokens = (
            logcontext.bind(request_id=request_id),
            security.client_address.set(client_ip(request)),
        )
        span = _start_span(request, request_id)
        return request_id, tokens, span

    def finish(request: HttpRequest, response: HttpResponse, request_id: str, span: trace.Span) -> HttpResponse:
        _end_span(span, request, response)
        response[REQUEST_ID_HEADER] = request_id
        _log_access(request, response)
        return response

    if iscoroutinefunction(get_response):

        async def middleware(request: HttpRequest) -> HttpResponse:
            request_id, _, span = begin(request)  # only ever under ASGI: left bound
            with trace.use_span(span, end_on_exit=False):
                response = await get_response(request)
            return finish(request, response, request_id, span)

    else:

        def middleware(request: HttpRequest) -> HttpResponse:
            request_id, (log_token, address_token), span = begin(request)
            try:
                with trace.use_span(span, end_on_exit=False):
                    response = get_response(request)
                return finish(request, response, request_id, span)
            finally:
                if not isinstance(request, ASGIRequest):
                    logcontext.unbind(log_token)
                    security.client_address.reset(address_token)

    return middleware


@sync_and_async_middleware
def content_security_policy_middleware(
    get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]],
) -> Callable:
    """Sends VOICEBOT_CONTENT_SECURITY_POLICY with every response that sets none of its own."""

    def finish(response: HttpResponse) -> HttpResponse:
        response.headers.setdefault("Content-Security-Policy", settings.VOICEBOT_CONTENT_SECURITY_POLICY)
        return response

    if iscoroutinefunction(get_response):

        async def middleware(request: HttpRequest) -> HttpResponse:
            return finish(await get_response(request))

    else:

        def middleware(request: HttpRequest) -> HttpResponse:
            return finish(get_response(request))

    return middleware


class DatabaseUnavailableMiddleware(MiddlewareMixin):
    """Answers 503 with Retry-After, as JSON under /api/ and as a plain page
    elsewhere, when a view fails because the database is away, instead of a
    500. The outage is logged as a warning, without a traceback: it is not a
    bug, and /readyz already reports it."""

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, DATABASE_UNAVAILABLE):
            return None
        logger.warning("Database unavailable, answering 503: %s", exception)
        if request.path.startswith("/api/"):
            message = "The service is temporarily unavailable; try again in a few seconds."
            response: HttpResponse = JsonResponse({"code": "database_unavailable", "message": message}, status=503)
        else:
            response = render(request, "503.html", status=503)
        response["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return response
