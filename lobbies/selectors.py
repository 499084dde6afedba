"""Reads of sessions and lobbies, shaped the way the API and protocol send them."""

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from lobbies import cache
from lobbies.models import ChatMessage, Lobby, LobbyBan, Membership, Session
from voicebot.db_router import read_from_replica


class Peer(TypedDict):
    peer_id: str
    name: str
    bot: bool
    muted: bool
    state: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def session_cache_key(digest: str) -> str:
    return f"session:{digest}"


def used_recently(session: Session, now: datetime) -> bool:
    """Whether the session was seen within SESSION_SEEN_REFRESH_SECONDS, so
    this use need not be recorded (nor its idle limit checked again)."""
    return session.last_seen_at > now - timedelta(seconds=settings.SESSION_SEEN_REFRESH_SECONDS)


def session_for_token(token: str) -> Session | None:
    """The session a resume token belongs to, unless it has not been used for
    SESSION_IDLE_DAYS: an expired token is refused like an unknown one.

    Identities rarely change, so they are cached, in this process and in the
    shared cache; unknown tokens are not. A use is written to the session's
    last_seen_at at most once per SESSION_SEEN_REFRESH_SECONDS (connected
    sessions are refreshed by the presence beat anyway).
    """
    if not token:
        return None
    digest = token_hash(token)
    key = session_cache_key(digest)
    session = cache.local.get(key)
    if session is cache.MISSING:
        session = cache.shared.get(key)
        if session is cache.MISSING:
            session = Session.objects.filter(token_hash=digest).first()
            if session is None:
                return None
            cache_session(session)
        cache.local.set(key, session)
    now = timezone.now()
    if used_recently(session, now):
        return session
    # A cached copy may trail the row, so the row decides, in one statement.
    idle_since = now - timedelta(days=settings.SESSION_IDLE_DAYS)
    if not Session.objects.filter(token_hash=digest, last_seen_at__gt=idle_since).update(last_seen_at=now):
        cache.local.forget(key)
        cache.shared.delete(key)
        return None
    session.last_seen_at = now
    cache_session(session)
    return session


def cache_session(session: Session) -> None:
    key = session_cache_key(session.token_hash)
    cache.shared.set(key, session, settings.LOCAL_CACHE_TTL_SECONDS)
    cache.local.set(key, session)


async def asession_for_token(token: str) -> Session | None:
    """session_for_token for async callers: a cached identity costs no thread hop."""
    if token:
        session = cache.local.get(session_cache_key(token_hash(token)))
        if session is not cache.MISSING and used_recently(session, timezone.now()):
            return session
    return await database_sync_to_async(session_for_token)(token)


def peer_of(membership: Membership) -> Peer:
    return {
        "peer_id": str(membership.session_id),
        "name": membership.session.name,
        "bot": membership.session.is_bot,
        "muted": membership.muted,
        "state": membership.state,
    }


def live_memberships(lobby_ids: set[int]) -> QuerySet[Membership]:
    """Who is in these lobbies now, oldest first in each."""
    live = Membership.objects.filter(lobby_id__in=lobby_ids, left_at__isnull=True).select_related("session")
    return live.order_by("lobby_id", "joined_at")


def connection_membership(*, lobby_name: str, session_id: str, channel_name: str) -> QuerySet[Membership]:
    """The live membership one connection holds in a lobby: a row or none."""
    return Membership.objects.filter(
        lobby__name=lobby_name, session_id=session_id, channel_name=channel_name, left_at__isnull=True
    )


def connection_memberships(
    connections: list[tuple[str, uuid.UUID, str]],
) -> dict[tuple[str, uuid.UUID, str], Membership]:
    """The live memberships that connections, each (lobby name, session id,
    channel name), hold: one query however many, keyed the same way, with
    their sessions."""
    wanted = Q()
    for lobby_name, session_id, channel_name in connections:
        wanted |= Q(lobby__name=lobby_name, session_id=session_id, channel_name=channel_name)
    if not wanted:
        return {}
    found = Membership.objects.filter(wanted, left_at__isnull=True).select_related("session", "lobby")
    return {(membership.lobby.name, membership.session_id, membership.channel_name): membership for membership in found}


class RosterEntry(TypedDict):
    peer: Peer
    # The channel that reaches the peer's connection.
    channel: str


def roster_key(lobby_id: int) -> str:
    return f"roster:{lobby_id}"


def lobby_roster(lobby: Lobby) -> list[RosterEntry]:
    """Who is in the lobby, from the shared cache while it matches the row's
    roster stamp, else from the database (and then cached)."""
    return lobby_rosters([lobby])[lobby.pk]


def lobby_rosters(lobbies: list[Lobby]) -> dict[int, list[RosterEntry]]:
    """lobby_roster for several lobbies, by lobby id: one round trip to the
    cache, and one query for those it does not hold."""
    cached = cache.shared.get_many([roster_key(lobby.pk) for lobby in lobbies])
    rosters: dict[int, list[RosterEntry]] = {}
    for lobby in lobbies:
        entry = cached.get(roster_key(lobby.pk))
        if entry is not None and entry["stamp"] == str(lobby.roster_stamp):
            rosters[lobby.pk] = entry["roster"]
    stale = [lobby for lobby in lobbies if lobby.pk not in rosters]
    if stale:
        fresh = rosters_from_database({lobby.pk for lobby in stale})
        cache_rosters([(lobby, fresh[lobby.pk]) for lobby in stale])
        rosters.update(fresh)
    return rosters


def rosters_from_database(lobby_ids: set[int]) -> dict[int, list[RosterEntry]]:
    """Who is in each of these lobbies, by lobby id, in one query."""
    rosters: dict[int, list[RosterEntry]] = {lobby_id: [] for lobby_id in lobby_ids}
    for membership in live_memberships(lobby_ids):
        rosters[membership.lobby_id].append({"peer": peer_of(membership), "channel": membership.channel_name})
    return rosters


def cache_rosters(rosters: list[tuple[Lobby, list[RosterEntry]]]) -> None:
    # Safe from any reader or writer: an entry is only believed while its
    # stamp is the row's, and each change to the roster writes a new stamp.
    entries = {roster_key(lobby.pk): {"stamp": str(lobby.roster_stamp), "roster": roster} for lobby, roster in rosters}
    cache.shared.set_many(entries, settings.ROSTER_CACHE_SECONDS)


def lobby_list(*, viewer: Session | None) -> list[dict]:
    """Public lobbies, and the viewer's own private ones, busiest first; none that is closed.

    Read from a replica when there is one, so it may lag a moment behind.
    """
    visible = Q(private=False)
    if viewer is not None:
        visible |= Q(created_by=viewer)
    lobbies = (
        Lobby.objects.filter(visible, closed_at__isnull=True)
        .annotate(participant_count=Count("memberships", filter=Q(memberships__left_at__isnull=True)))
        .order_by("-participant_count", "-last_active_at")[: settings.LOBBY_LIST_LIMIT]
    )
    with read_from_replica():
        return [lobby_summary(lobby, lobby.participant_count) for lobby in lobbies]


def lobby_summary(lobby: Lobby, participant_count: int) -> dict:
    return {
        "name": lobby.name,
        "private": lobby.private,
        "max_participants": lobby.max_participants,
        "participant_count": participant_count,
        "has_password": lobby.has_password,
    }


def lobby_detail(*, name: str, password: str = "") -> dict | None:
    """The lobby and who is in it; None if there is no such lobby or, for a
    lobby with a password, `password` is not it: the asker cannot tell which."""
    lobby = Lobby.objects.filter(name=name).first()
    if lobby is None or lobby.has_password:
        if not password or not lobby_password_opens(lobby, password):
            return None
    participants = [entry["peer"] for entry in lobby_roster(lobby)]
    return {**lobby_summary(lobby, len(participants)), "participants": participants}


def lobby_password_opens(lobby: Lobby | None, password: str) -> bool:
    """Whether `password` is the password of `lobby`, which may not exist.

    For a lobby that does not exist a password is hashed all the same, so the
    answer takes as long as for a wrong one and its timing tells nothing.
    """
    if lobby is None:
        make_password(password)
        return False
    return lobby.password_matches(password)


def bans_cache_key(lobby_id: int) -> str:
    return f"bans:{lobby_id}"


def lobby_bans(lobbies: list[Lobby]) -> dict[int, dict[Any, datetime]]:
    """Each lobby's live bans (session id -> until when it may not rejoin), by lobby id.

    Every newcomer's join asks, and bans are rare: each lobby's live bans are
    kept in the in-process cache, and a new or lifted ban is broadcast. Those
    the cache does not hold are read in one query.
    """
    bans: dict[int, dict[Any, datetime]] = {}
    for lobby in lobbies:
        cached = cache.local.get(bans_cache_key(lobby.pk))
        if cached is not cache.MISSING:
            bans[lobby.pk] = cached
    missing: dict[int, dict[Any, datetime]] = {lobby.pk: {} for lobby in lobbies if lobby.pk not in bans}
    if missing:
        live = LobbyBan.objects.filter(lobby_id__in=missing, until__gt=timezone.now())
        for lobby_id, session_id, until in live.values_list("lobby_id", "session_id", "until"):
            missing[lobby_id][session_id] = max(until, missing[lobby_id].get(session_id, until))
        for lobby_id, read in missing.items():
            cache.local.set(bans_cache_key(lobby_id), read)
        bans.update(missing)
    return bans


def cache_no_bans(lobby: Lobby) -> None:
    """A lobby just created has no bans: its first joins need not ask."""
    cache.local.set(bans_cache_key(lobby.pk), {})


def chat_frame(message: ChatMessage) -> dict[str, Any]:
    """A stored chat message as clients receive it, live and in chat_history."""
    return {
        "type": "chat",
        "id": message.pk,
        "from": str(message.session_id),
        "name": message.author_name,
        "text": message.text,
        "ts": message.created_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }


def chat_history(lobby: Lobby | int, after: int | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Up to `limit` of the lobby's chat messages after the id `after` (from
    the oldest kept if None), oldest first, and whether more follow."""
    messages = ChatMessage.objects.filter(lobby=lobby).order_by("id")
    if after is not None:
        messages = messages.filter(id__gt=after)
    page = list(messages[: limit + 1])
    return [chat_frame(message) for message in page[:limit]], len(page) > limit


def member_chat_history(
    *, lobby_name: str, session_id: str, channel_name: str, after: int | None, limit: int
) -> tuple[list[dict[str, Any]], bool] | None:
    """chat_history for the connection holding the session's place in the
    lobby; None if it holds none (only members may read a lobby's chat)."""
    lobby_id = (
        connection_membership(lobby_name=lobby_name, session_id=session_id, channel_name=channel_name)
        .values_list("lobby_id", flat=True)
        .first()
    )
    if lobby_id is None:
        return None
    return chat_history(lobby_id, after, limit)


def member_roster(*, lobby_name: str, session_id: str, channel_name: str) -> list[RosterEntry] | None:
    """The lobby's roster for the connection holding the session's place in
    it; None if it holds none."""
    membership = (
        connection_membership(lobby_name=lobby_name, session_id=session_id, channel_name=channel_name)
        .select_related("lobby")
        .first()
    )
    if membership is None:
        return None
    return lobby_roster(membership.lobby)


def lobby_last_chat_ids(lobby_ids: set[int]) -> dict[int, int | None]:
    """The id of each lobby's newest chat message (None if it has none), in one query."""
    newest = ChatMessage.objects.filter(lobby=OuterRef("pk")).order_by("-id").values("id")[:1]
    found = Lobby.objects.filter(pk__in=lobby_ids).annotate(last_chat_id=Subquery(newest))
    return dict(found.values_list("pk", "last_chat_id"))
