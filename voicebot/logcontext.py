"""Who a log line is about: request, connection, session, lobby, bot.

The fields live in a context variable, so whatever runs on behalf of one
request or connection (its handlers, its database_sync_to_async calls, the
tasks it starts) logs them without passing them along. ContextFilter puts them
on every record; the JSON formatter then writes them as fields.
"""

import logging
import re
import socket
import uuid
from collections.abc import Mapping
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import Any

import redis
from django.db import InterfaceError, OperationalError

# The fields, in the order the text format shows them.
FIELDS = ("request_id", "connection_id", "session_id", "lobby", "bot", "assignment_id")

# Never changed in place: bind() sets a new mapping, so tasks that copied the
# context earlier keep what they had.
_context: ContextVar[Mapping[str, str]] = ContextVar("voicebot_log_context", default=MappingProxyType({}))

# A request ID from outside is kept only if it is short and plain, so a client
# cannot inject log lines or bloat every record.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# `token=...` in a URL or query string (the lobby WebSocket URL carries one).
TOKEN_PATTERN = re.compile(r"(token=)[^&\s'\"]+", re.IGNORECASE)


def bind(**fields: Any) -> Token:
    """Add fields to the current context; returns a token for unbind()."""
    merged = {**_context.get(), **{name: str(value) for name, value in fields.items() if value is not None}}
    return _context.set(merged)


def unbind(token: Token) -> None:
    _context.reset(token)


def current() -> dict[str, str]:
    return dict(_context.get())


def new_id() -> str:
    return uuid.uuid4().hex


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-ID when it is acceptable, else a fresh one."""
    if header and REQUEST_ID_PATTERN.fullmatch(header):
        return header
    return new_id()


def redact(text: str) -> str:
    return TOKEN_PATTERN.sub(r"\1[redacted]", text)


class ContextFilter(logging.Filter):
    """Adds the bound context to each record, and keeps tokens out of messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _context.get().items():
            # A field given with extra= (the audit log's lobby) wins.
            if not hasattr(record, name):
                setattr(record, name, value)
        self._redact(record)
        return True

    @staticmethod
    def _redact(record: logging.LogRecord) -> None:
        # Libraries may log a URL with its query string; checked cheaply first.
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001
            return  # a malformed call: the handler reports it as usual when formatting
        if "token=" in message.lower():
            record.msg = redact(message)
            record.args = None


class TextFormatter(logging.Formatter):
    """The human-readable format, with the context appended as key=value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s", *args, **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = " ".join(f"{name}={getattr(record, name)}" for name in FIELDS if hasattr(record, name))
        if not context:
            return text
        # Keep a traceback last, after the context of the line it belongs to.
        first, newline, rest = text.partition("\n")
        return f"{first} [{context}]{newline}{rest}"


# What Django raises when the database cannot be reached or its connection
# broke: a restart, a failover, or no pooled connection within
# DATABASE_POOL_TIMEOUT (psycopg_pool's PoolTimeout, which Django wraps).
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)
# Raised when Redis, Postgres or any peer cannot be reached. Not all of
# OSError: a missing file or a refused permission is a bug to see with its traceback.
CONNECTION_ERRORS = (
    ConnectionError,
    TimeoutError,
    socket.gaierror,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    *DATABASE_UNAVAILABLE,
)


def caused_by_lost_connection(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is a lost connection."""
    for _ in range(5):
        if error is None:
            return False
        if isinstance(error, CONNECTION_ERRORS):
            return True
        error = error.__cause__ or error.__context__
    return False


class OutageFilter(logging.Filter):
    """A lost connection is an outage, not a bug: its records become one
    warning line naming the error, without a traceback (while Redis is away,
    channels-redis alone reports one a second per process). Other errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if caused_by_lost_connection(error):
            record.msg = f"{record.getMessage()}: {type(error).__name__}: {error}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class ConnectionLinesFilter(logging.Filter):
    """Drops the lines uvicorn and websockets log for each WebSocket
    accepted, opened and closed: the lobby consumer logs each connect and
    close itself, with the lobby, session and outcome. During a burst of
    connects, logging took 12% of the event loop (py-spy), and two of the
    three lines per connect were these."""

    LINES = frozenset({'%s - "WebSocket %s" [accepted]', "connection open", "connection closed"})

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.LINES


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """The LOGGING setting: one handler on stderr, JSON or text."""
    formatters = {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "format": "%(levelname)s %(name)s %(message)s",
            "rename_fields": {"levelname": "level", "name": "logger"},
            # An ISO 8601 UTC "timestamp" field.
            "timestamp": True,
        },
        "text": {"()": "voicebot.logcontext.TextFormatter"},
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "context": {"()": "voicebot.logcontext.ContextFilter"},
            "outage": {"()": "voicebot.logcontext.OutageFilter"},
            "connection_lines": {"()": "voicebot.logcontext.ConnectionLinesFilter"},
        },
        "formatters": formatters,
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": fmt, "filters": ["context", "outage"]},
        },
        "root": {"handlers": ["console"], "level": level},
        # uvicorn sets up its own plain-text handler before it loads Django;
        # this replaces it, so its lines are formatted like everyone else's.
        # Its access log stays off: voicebot.access logs every request, and
        # the lobby consumer every WebSocket.
        "loggers": {
            "uvicorn": {"handlers": ["console"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": [], "propagate": False},
            "uvicorn.error": {"filters": ["connection_lines"]},
        },
    }


def scope_header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin1")
    return None


def connection_fields(scope: dict[str, Any]) -> dict[str, str]:
    """A WebSocket's context: a fresh connection ID, and the handshake's
    X-Request-ID if acceptable (else a fresh one)."""
    return {"connection_id": new_id(), "request_id": request_id_from(scope_header(scope, b"x-request-id"))}
