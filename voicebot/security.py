"""Who may open a WebSocket, and the client address of the HTTP request being served."""

from contextvars import ContextVar
from typing import Any
from urllib.parse import ParseResult, urlparse

from channels.db import database_sync_to_async
from channels.security.websocket import OriginValidator, WebsocketDenier
from django.conf import settings

from lobbies.ratelimit import client_ip
from monitoring.services import audit_record

# The client's address of the HTTP request being served (as the rate limits
# see it, lobbies.ratelimit.client_ip); set by
# voicebot.middleware.request_context_middleware. Services called from a view
# or an admin action read it for their audit events.
client_address: ContextVar[str | None] = ContextVar("voicebot_client_address", default=None)

# An Origin header longer than this is cut short in the audit event.
MAX_AUDITED_ORIGIN = 200


def scope_origin(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"origin":
            return value.decode("latin1")
    return None


class BrowserOriginValidator(OriginValidator):
    """Browsers always send Origin, so one from a host we do not serve is a
    cross-site page and is refused, and recorded as an audit event. Clients
    that send none (bots, scripts) are not browsers and are authenticated by
    their token alone."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        origin = scope_origin(scope)
        try:
            allowed = self.valid_origin(None if origin is None else urlparse(origin))
        except ValueError:  # a malformed IPv6 host or port, which no browser sends
            allowed = False
        if allowed:
            return await self.application(scope, receive, send)
        await database_sync_to_async(audit_record)(
            action="origin_rejected",
            ip=client_ip(scope),
            detail={"origin": origin[:MAX_AUDITED_ORIGIN] if origin else "", "path": scope.get("path", "")},
        )
        return await WebsocketDenier()(scope, receive, send)

    def valid_origin(self, parsed_origin: ParseResult | None) -> bool:
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)


def origin_validator(application):
    return BrowserOriginValidator(application, settings.ALLOWED_HOSTS)
