"""Read replicas: which database each query goes to.

Everything goes to the primary, "default", except listings: reads that their
caller marks with `read_from_replica()`. Those go to a replica (the aliases
replica_1, replica_2, ... that DATABASE_REPLICA_URL adds), which may lag the
primary by a moment. So mark only reads that may be a little stale: the lobby
list and the admin's list pages, never a read that must see a write just made
(joins, a session looked up by its token, a lobby's page right after it was
created, anything in lobbies/services.py).

The mark is a context variable: it holds for the code inside the `with`
block and for what that code runs through asgiref's sync_to_async, and for
nothing running at the same time on other threads or in other tasks.
"""

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from django.db import DEFAULT_DB_ALIAS, OperationalError, connections
from django.http import HttpRequest, HttpResponse
from django.template.response import SimpleTemplateResponse

logger = logging.getLogger(__name__)

PRIMARY = DEFAULT_DB_ALIAS
REPLICA_PREFIX = "replica_"
# A replica that could not be reached is left out for this long, so that
# listings do not each wait DATABASE_POOL_TIMEOUT for it.
UNREACHABLE_RETRY_SECONDS = 30.0

_listing: ContextVar[bool] = ContextVar("voicebot_read_from_replica", default=False)
# alias -> time.monotonic() until which it is left out
_unreachable_until: dict[str, float] = {}


@contextmanager
def read_from_replica() -> Iterator[None]:
    """Send the reads made inside the block to a replica, if one is configured and reachable."""
    token = _listing.set(True)
    try:
        yield
    finally:
        _listing.reset(token)


def replica_aliases() -> list[str]:
    return [alias for alias in connections if alias.startswith(REPLICA_PREFIX)]


def pick_replica() -> str | None:
    """A reachable replica, chosen at random, or None when there is none."""
    now = time.monotonic()
    candidates = [alias for alias in replica_aliases() if _unreachable_until.get(alias, 0.0) <= now]
    random.shuffle(candidates)
    for alias in candidates:
        if _reachable(alias):
            return alias
    return None


def _reachable(alias: str) -> bool:
    connection = connections[alias]
    if connection.connection is not None:
        return True
    try:
        # Takes a connection from the alias's pool; the query would anyway.
        connection.ensure_connection()
    except OperationalError as error:
        _unreachable_until[alias] = time.monotonic() + UNREACHABLE_RETRY_SECONDS
        logger.warning(
            "Read replica %s cannot be reached, listings read the primary for %d s: %s",
            alias,
            UNREACHABLE_RETRY_SECONDS,
            error,
        )
        return False
    return True


class ReplicaRouter:
    """Listed in DATABASE_ROUTERS when DATABASE_REPLICA_URL is set."""

    def db_for_read(self, model: type, **hints: Any) -> str:
        if not _listing.get():
            return PRIMARY
        # Inside a transaction on the primary, reads stay consistent with it.
        if connections[PRIMARY].in_atomic_block:
            return PRIMARY
        return pick_replica() or PRIMARY

    def db_for_write(self, model: type, **hints: Any) -> str:
        return PRIMARY

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        # The primary and its replicas hold the same rows.
        databases = {PRIMARY, *replica_aliases()}
        if obj1._state.db in databases and obj2._state.db in databases:
            return True
        return None

    def allow_migrate(self, db: str, app_label: str, model_name: str | None = None, **hints: Any) -> bool:
        # Replicas get their schema by replication.
        return db == PRIMARY


class ChangelistFromReplicaMixin:
    """For a ModelAdmin: its list page reads from a replica."""

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            # Actions and list_editable saves change what they read: the primary.
            return super().changelist_view(request, extra_context)
        with read_from_replica():
            response = super().changelist_view(request, extra_context)
            # The rows are a lazy queryset that the template evaluates: render here, inside.
            if isinstance(response, SimpleTemplateResponse) and not response.is_rendered:
                response.render()
        return response
