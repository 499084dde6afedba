"""Writes to sessions and lobbies.

Every change that others in a lobby must hear of is published here, once the
transaction has committed, to the lobby's channel-layer group. Consumers only
relay what they receive; they never publish state changes themselves.
"""

import hashlib
import math
import secrets
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from lobbies import selectors
from lobbies.models import ChatMessage, Lobby, LobbyBan, Membership, Session
from lobbies.publisher import publisher
from lobbies.selectors import Peer, peer_of, token_hash
from monitoring.services import audit_record
from voicebot.security import client_address


class LobbyNameTaken(Exception):
    pass


class LobbyFull(Exception):
    pass


class LobbyClosed(Exception):
    pass


class BadPassword(Exception):
    """The password is missing or wrong, or the lobby it was given for does not exist."""


class SessionKicked(Exception):
    """An administrator kicked the session out of the lobby, and its ban has not run out."""

    def __init__(self, seconds_left: int) -> None:
        super().__init__(f"may rejoin in {seconds_left} s")
        self.seconds_left = seconds_left


@dataclass
class JoinResult:
    lobby: Lobby
    membership_id: int
    peer: Peer
    # The others already in the lobby, each with the channel that reaches it.
    peers: list[tuple[Peer, str]]
    # The newest chat message's id (None if none): chat after it reaches the
    # connection through the lobby's group, which it joined before.
    last_chat_id: int | None


def lobby_group(lobby_name: str) -> str:
    """Channel-layer group of a lobby. Group names must be ASCII, lobby names need not be."""
    return "lobby." + hashlib.sha256(lobby_name.encode()).hexdigest()[:40]


def publish(lobby_name: str, event: dict[str, Any]) -> None:
    """Send `event` to everyone in the lobby once the current transaction commits."""
    transaction.on_commit(partial(publisher.publish, ("group", lobby_group(lobby_name), event)))


def tell_channel(channel_name: str, event: dict[str, Any]) -> None:
    """Send `event` to one connection once the current transaction commits."""
    transaction.on_commit(partial(publisher.publish, ("channel", channel_name, event)))


def session_create(*, name: str, is_bot: bool = False) -> tuple[Session, str]:
    """Create a session and return it with its resume token, which is not stored."""
    token = secrets.token_urlsafe(32)
    session = Session.objects.create(name=name, is_bot=is_bot, token_hash=token_hash(token))
    # Its first join usually follows at once.
    selectors.cache_session(session)
    return session, token


def lobby_create(
    *, name: str, private: bool, max_participants: int, created_by: Session, password: str | None = None
) -> Lobby:
    lobby = Lobby(name=name, private=private, max_participants=max_participants, created_by=created_by)
    lobby.set_password(password)
    try:
        with transaction.atomic():
            lobby.save(force_insert=True)
            # Known to be empty and free of bans: the first joins need not ask the database.
            selectors.cache_rosters([(lobby, [])])
            selectors.cache_no_bans(lobby)
            return lobby
    except IntegrityError:
        raise LobbyNameTaken(name)


@dataclass
class JoinRequest:
    """One connection asking for a place in a lobby (see lobby_join)."""

    lobby_name: str
    session: Session
    channel_name: str
    password: str = ""
    # The lobby's password hash, once `password` was checked against it.
    opened_hash: str = ""


def lobby_join(*, lobby_name: str, session: Session, channel_name: str, password: str = "") -> JoinResult:
    """Put `session` in the lobby through `channel_name`, creating a public
    lobby of that name if needed (but not from a connection that brings a password).

    A session still in the lobby (reconnecting, or connected through another
    connection) resumes its place: the older connection, if open, is closed,
    and the others see the peer go `reconnecting` and come back `connected`.
    Anyone else needs the lobby's password, if it has one, and is refused
    from a closed lobby and from one it was kicked out of for a while.
    """
    request = JoinRequest(lobby_name=lobby_name, session=session, channel_name=channel_name, password=password)
    outcome = lobby_join_many(requests=[request])[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def lobby_join_many(*, requests: list[JoinRequest]) -> list[JoinResult | Exception]:
    """lobby_join for many connections at once, in one transaction: each
    request's result, or the exception that refused it (LobbyFull, BadPassword,
    LobbyClosed, SessionKicked). They are decided in the order given, exactly
    as if joined one after the other. An error of the database fails them all.

    A reconnect storm brings hundreds of joins a second: one at a time, each
    held its lobby's lock for several round trips to Postgres and Redis.
    """
    outcomes = _join_batch(requests)
    # Hashing is slow on purpose, so it is done only for the joins that need
    # it, outside the lobbies' locks; they then join again, and the join checks
    # that the hash is still the lobby's.
    opened = []
    for index, (request, outcome) in enumerate(zip(requests, outcomes)):
        if isinstance(outcome, BadPassword) and request.password:
            lobby = Lobby.objects.filter(name=request.lobby_name).first()
            if selectors.lobby_password_opens(lobby, request.password):
                request.opened_hash = lobby.password_hash
                opened.append(index)
    if opened:
        for index, outcome in zip(opened, _join_batch([requests[index] for index in opened])):
            outcomes[index] = outcome
    return outcomes


@contextmanager
def _soft_commit_transaction() -> Iterator[None]:
    """A transaction that changes who is in a lobby now, committed without
    waiting for the disk.

    Should the machine crash, Postgres may forget the last fraction of a
    second of joins, leaves and mutes (at most 3 × wal_writer_delay), whose
    connections are gone and come back anyway; it never forgets anything
    inconsistently, and a restart of Postgres alone loses nothing. Not waiting
    for a flush per join is what lets a reconnect storm through. Sessions,
    lobbies created through the API, chat and administrators' actions commit
    durably as usual.
    """
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        yield


def _create_lobbies(requests: list[JoinRequest]) -> None:
    """Create the public lobbies that joins without a password ask for and
    that do not exist yet, in one statement committed at once: the joins then
    lock every lobby they need in one statement, in name order, so that two
    batches (perhaps in two processes) cannot wait on each other."""
    wanted = {request.lobby_name: request.session for request in requests if not request.password}
    existing = set(Lobby.objects.filter(name__in=wanted).values_list("name", flat=True))
    # Another process may create some of them first: theirs stand.
    new = [Lobby(name=name, created_by=wanted[name]) for name in sorted(wanted.keys() - existing)]
    Lobby.objects.bulk_create(new, ignore_conflicts=True)


def _join_batch(requests: list[JoinRequest]) -> list[JoinResult | Exception]:
    _create_lobbies(requests)
    with _soft_commit_transaction():
        # The row locks serialise changes to each lobby's roster: two joins
        # cannot both take its last place, and the cached roster follows commit order.
        lobbies = _lock_lobbies({request.lobby_name for request in requests})
        rosters = selectors.lobby_rosters(list(lobbies.values()))
        bans = selectors.lobby_bans(list(lobbies.values()))
        memberships = _live_memberships_in(rosters, requests)
        joins = [_join_one(request, lobbies, rosters, bans, memberships) for request in requests]

        # Every membership read from the database belongs to a session that resumed it.
        resumed = [membership for membership in memberships.values() if membership.pk is not None]
        if resumed:
            # Only the channel differs from row to row: bulk_update builds a
            # CASE per row and field in Python, the costliest part of a storm's joins.
            Membership.objects.bulk_update(resumed, ["channel_name"])
            Membership.objects.filter(pk__in=[membership.pk for membership in resumed]).update(
                state=Membership.State.CONNECTED, disconnected_at=None, last_seen_at=timezone.now()
            )
        Membership.objects.bulk_create([membership for membership in memberships.values() if membership.pk is None])
        changed = {join[0].pk for join in joins if not isinstance(join, Exception)}
        _rosters_changed([(lobby, rosters[lobby.pk]) for lobby in lobbies.values() if lobby.pk in changed])
        last_chat_ids = selectors.lobby_last_chat_ids(changed) if changed else {}
        return [join if isinstance(join, Exception) else _join_result(*join, rosters, last_chat_ids) for join in joins]


def _live_memberships_in(
    rosters: dict[int, list[selectors.RosterEntry]], requests: list[JoinRequest]
) -> dict[tuple[int, str], Membership]:
    """The live memberships of the requesting sessions that are in the
    rosters already, by (lobby id, session id): they resume their places."""
    sessions = {str(request.session.pk) for request in requests}
    wanted = Q()
    for lobby_id, roster in rosters.items():
        present = [entry["peer"]["peer_id"] for entry in roster if entry["peer"]["peer_id"] in sessions]
        if present:
            wanted |= Q(lobby_id=lobby_id, session_id__in=present)
    if not wanted:
        return {}
    found = Membership.objects.select_related("session").filter(wanted, left_at__isnull=True)
    return {(membership.lobby_id, str(membership.session_id)): membership for membership in found}


def _join_one(
    request: JoinRequest,
    lobbies: dict[str, Lobby],
    rosters: dict[int, list[selectors.RosterEntry]],
    bans: dict[int, dict[Any, datetime]],
    memberships: dict[tuple[int, str], Membership],
) -> tuple[Lobby, selectors.RosterEntry, Membership] | Exception:
    """Decide one join of a batch, changing `rosters` and `memberships` (not
    yet the database) as it goes: the lobby, the newcomer's roster entry and
    its membership, or the exception that refuses it."""
    lobby = lobbies.get(request.lobby_name)
    if lobby is None:
        # A password must not create a lobby: that would tell which names exist.
        return BadPassword(request.lobby_name) if request.password else LobbyClosed(request.lobby_name)
    roster = rosters[lobby.pk]
    session_id = str(request.session.pk)
    mine = next((entry for entry in roster if entry["peer"]["peer_id"] == session_id), None)
    if mine is not None and (lobby.pk, session_id) not in memberships:
        # Its row was deleted without the services (in the admin, say), so the
        # cached roster outlived it: the session joins afresh.
        roster = [entry for entry in roster if entry is not mine]
        mine = None
    if mine is None:
        try:
            _check_admission(lobby, request.session, request.opened_hash, bans[lobby.pk])
        except (BadPassword, LobbyClosed, SessionKicked) as refusal:
            return refusal
        if len(roster) >= lobby.max_participants:
            return LobbyFull(request.lobby_name)
        membership = Membership(session=request.session, lobby=lobby, channel_name=request.channel_name)
        memberships[lobby.pk, session_id] = membership
        joined = {"type": "lobby.peer_joined", "peer": peer_of(membership), "channel": request.channel_name}
        publish(request.lobby_name, joined)
    else:
        membership = memberships[lobby.pk, session_id]
        _resume(membership, request.lobby_name, request.channel_name)
    entry: selectors.RosterEntry = {"peer": peer_of(membership), "channel": request.channel_name}
    rosters[lobby.pk] = [entry if old is mine else old for old in roster] if mine else [*roster, entry]
    return lobby, entry, membership


def _join_result(
    lobby: Lobby,
    entry: selectors.RosterEntry,
    membership: Membership,
    rosters: dict[int, list[selectors.RosterEntry]],
    last_chat_ids: dict[int, int | None],
) -> JoinResult:
    # The others are everyone in the lobby once the whole batch is in,
    # including those who joined after this one in the batch: the news of them
    # is already on its way to this connection, and could otherwise reach it
    # after its client (told by another) sent them something.
    peer_id = entry["peer"]["peer_id"]
    return JoinResult(
        lobby=lobby,
        membership_id=membership.pk,
        peer=entry["peer"],
        peers=[(other["peer"], other["channel"]) for other in rosters[lobby.pk] if other["peer"]["peer_id"] != peer_id],
        last_chat_id=last_chat_ids[lobby.pk],
    )


def _check_admission(lobby: Lobby, session: Session, opened_hash: str, bans: dict[Any, datetime]) -> None:
    """Refuse a newcomer that may not take a place in `lobby`, however full
    it is; `bans` are the lobby's (selectors.lobby_bans)."""
    # Bot sessions exist only for bots an administrator put in a lobby, so
    # they need no password.
    if lobby.password_hash and lobby.password_hash != opened_hash and not session.is_bot:
        # No password was checked, or an administrator changed it since.
        raise BadPassword(lobby.name)
    if lobby.closed_at is not None:
        raise LobbyClosed(lobby.name)
    until, now = bans.get(session.pk), timezone.now()
    if until is not None and until > now:
        raise SessionKicked(math.ceil((until - now).total_seconds()))


def _resume(membership: Membership, lobby_name: str, channel_name: str) -> None:
    """Give the membership to a new connection; the caller saves it."""
    if membership.state == Membership.State.CONNECTED:
        # Its old connection is still open, or its server died: either way it is gone now.
        tell_channel(membership.channel_name, {"type": "lobby.replaced"})
        membership.state = Membership.State.RECONNECTING
        publish(lobby_name, {"type": "lobby.peer_updated", "peer": peer_of(membership)})
    membership.state = Membership.State.CONNECTED
    membership.channel_name = channel_name
    membership.disconnected_at = None
    membership.last_seen_at = timezone.now()
    publish(lobby_name, {"type": "lobby.peer_updated", "peer": peer_of(membership), "channel": channel_name})


def _lock_lobby(lobby_name: str) -> Lobby | None:
    """Take the lobby's row lock; every change to a roster holds it (see lobby_join)."""
    return Lobby.objects.select_for_update().filter(name=lobby_name).first()


def _roster_changed(lobby: Lobby) -> None:
    """_rosters_changed for one lobby, its roster read from the database."""
    _rosters_changed([(lobby, selectors.rosters_from_database({lobby.pk})[lobby.pk])])


def _rosters_changed(rosters: list[tuple[Lobby, list[selectors.RosterEntry]]]) -> None:
    """Stamp each lobby's new roster and cache it, in one statement and one round trip.

    Runs inside the transaction that made the changes, under the lobbies'
    locks: should the transaction fail, the cached entries carry a stamp the
    rows never get, so no one believes them. The lobbies share the new stamp:
    it only has to differ from each lobby's earlier ones.
    """
    if not rosters:
        return
    stamp, now = uuid.uuid4(), timezone.now()
    Lobby.objects.filter(pk__in=[lobby.pk for lobby, _ in rosters]).update(roster_stamp=stamp, last_active_at=now)
    for lobby, _ in rosters:
        lobby.roster_stamp, lobby.last_active_at = stamp, now
    selectors.cache_rosters(rosters)


@dataclass
class LeaveRequest:
    """One connection giving up its place: at once (`deliberate`, a close
    with 1000) or for the grace period (a drop), see lobby_leave and lobby_disconnect."""

    lobby_name: str
    session_id: str
    channel_name: str
    deliberate: bool


def lobby_leave(*, lobby_name: str, session_id: str, channel_name: str) -> None:
    """End the session's stay in the lobby at once, if `channel_name` still holds it."""
    lobby_leave_many(
        requests=[LeaveRequest(lobby_name=lobby_name, session_id=session_id, channel_name=channel_name, deliberate=True)]
    )


def lobby_disconnect(*, lobby_name: str, session_id: str, channel_name: str) -> None:
    """The connection dropped: keep the place for the grace period, then end it."""
    lobby_leave_many(
        requests=[LeaveRequest(lobby_name=lobby_name, session_id=session_id, channel_name=channel_name, deliberate=False)]
    )


def lobby_leave_many(*, requests: list[LeaveRequest]) -> list[bool]:
    """lobby_leave and lobby_disconnect for many connections at once, in one
    transaction: whether each connection still held its place. A reconnect
    storm starts with every connection of a server dropping at once."""
    wanted_keys = [(request.lobby_name, request.session_id, request.channel_name) for request in requests]
    wanted = dict(zip(wanted_keys, requests))
    now = timezone.now()
    with _soft_commit_transaction():
        lobbies = _lock_lobbies({request.lobby_name for request in requests})
        names = {lobby.pk: lobby.name for lobby in lobbies.values()}
        found = (
            Membership.objects.select_related("session")
            .select_for_update(of=("self",))
            .filter(
                lobby__in=lobbies.values(),
                channel_name__in=[request.channel_name for request in requests],
                left_at__isnull=True,
            )
        )
        held = {}
        for membership in found:
            key = (names[membership.lobby_id], str(membership.session_id), membership.channel_name)
            if key in wanted:
                held[key] = membership
        _depart(
            lobbies,
            ended=[membership for key, membership in held.items() if wanted[key].deliberate],
            dropped=[(membership, now) for key, membership in held.items() if not wanted[key].deliberate],
            now=now,
        )
    return [key in held for key in wanted_keys]


def memberships_touch(*, membership_ids: list[int]) -> None:
    """Record that these connections, and their sessions, are alive: two statements however many."""
    if not membership_ids:
        return
    now = timezone.now()
    Membership.objects.filter(pk__in=membership_ids, left_at__isnull=True).update(last_seen_at=now)
    Session.objects.filter(memberships__pk__in=membership_ids).update(last_seen_at=now)


def memberships_expire(*, lobby_limit: int = 50) -> int:
    """Catch up with connections that are gone, and end the stays of those who
    did not come back, in at most `lobby_limit` lobbies (one transaction):
    how many lobbies it changed. Call again while that is `lobby_limit`.

    A connected row its server stopped refreshing belonged to a server that
    died or stopped: it becomes `reconnecting`, as if from its last refresh.
    A reconnecting row past the grace period ends, and the others see
    `peer_left`. Safe to run in every server process at once: each row is
    changed under its lobby's lock and only if still due, so everyone hears
    of each change once. When a server holding thousands of connections dies,
    the others catch up a lobby at a time, not a row at a time.
    """
    now = timezone.now()
    lost = Q(
        left_at__isnull=True,
        state=Membership.State.CONNECTED,
        last_seen_at__lt=now - timedelta(seconds=2 * settings.PRESENCE_INTERVAL_SECONDS),
    )
    expired = Q(
        left_at__isnull=True,
        state=Membership.State.RECONNECTING,
        disconnected_at__lt=now - timedelta(seconds=settings.LOBBY_RESUME_GRACE_SECONDS),
    )
    due = Membership.objects.filter(lost | expired).order_by("lobby__name").values_list("lobby__name", flat=True)
    names = set(due.distinct()[:lobby_limit])
    if not names:
        return 0
    with _soft_commit_transaction():
        lobbies = _lock_lobbies(names)
        found = list(
            Membership.objects.select_related("session")
            .select_for_update(of=("self",))
            .filter(lost | expired, lobby__in=lobbies.values())
        )
        _depart(
            lobbies,
            ended=[membership for membership in found if membership.state == Membership.State.RECONNECTING],
            dropped=[
                (membership, membership.last_seen_at)
                for membership in found
                if membership.state == Membership.State.CONNECTED
            ],
            now=now,
        )
    return len(names)


def _lock_lobbies(names: set[str]) -> dict[str, Lobby]:
    """Take the row locks of these lobbies, in name order, so that two
    transactions taking several cannot wait on each other."""
    return {lobby.name: lobby for lobby in Lobby.objects.select_for_update().filter(name__in=names).order_by("name")}


def _depart(
    lobbies: dict[str, Lobby], *, ended: list[Membership], dropped: list[tuple[Membership, datetime]], now: datetime
) -> None:
    """End the stays `ended` now, and mark `dropped` reconnecting since the
    time given with each; the others in their lobbies hear of each, and each
    lobby whose roster changed gets its new roster (one query for them all).
    The caller holds the lobbies' locks and the memberships' rows."""
    names = {lobby.pk: lobby.name for lobby in lobbies.values()}
    # One UPDATE per moment of dropping, not bulk_update's CASE per row: the
    # drops of one batch share theirs, and so do those of a dead server (its last refresh).
    dropped_at: dict[datetime, list[int]] = defaultdict(list)
    for membership, since in dropped:
        membership.state = Membership.State.RECONNECTING
        membership.disconnected_at = since
        dropped_at[since].append(membership.pk)
        publish(names[membership.lobby_id], {"type": "lobby.peer_updated", "peer": peer_of(membership)})
    for membership in ended:
        membership.left_at = now
        membership.state = Membership.State.LEFT
        publish(
            names[membership.lobby_id],
            {"type": "lobby.peer_left", "peer_id": str(membership.session_id), "channel": membership.channel_name},
        )
    for since, membership_ids in dropped_at.items():
        Membership.objects.filter(pk__in=membership_ids).update(
            state=Membership.State.RECONNECTING, disconnected_at=since
        )
    if ended:
        Membership.objects.filter(pk__in=[membership.pk for membership in ended]).update(
            left_at=now, state=Membership.State.LEFT
        )
        Session.objects.filter(pk__in=[membership.session_id for membership in ended]).update(last_seen_at=now)
    changed = {membership.lobby_id for membership in ended} | {membership.lobby_id for membership, _ in dropped}
    rosters = selectors.rosters_from_database(changed)
    _rosters_changed([(lobby, rosters[lobby.pk]) for lobby in lobbies.values() if lobby.pk in changed])


def membership_set_muted(*, lobby_name: str, session_id: str, channel_name: str, muted: bool) -> None:
    with _soft_commit_transaction():
        lobby = _lock_lobby(lobby_name)
        membership = _live_membership(lobby_name, session_id, channel_name)
        if lobby is None or membership is None:
            return
        _set_muted(lobby, membership, muted)


def _set_muted(lobby: Lobby, membership: Membership, muted: bool) -> None:
    if membership.muted == muted:
        return
    membership.muted = muted
    membership.save(update_fields=["muted"])
    publish(lobby.name, {"type": "lobby.peer_updated", "peer": peer_of(membership)})
    _roster_changed(lobby)


def _live_membership(lobby_name: str, session_id: str, channel_name: str) -> Membership | None:
    """The membership held by one connection, locked for the rest of the transaction."""
    return (
        selectors.connection_membership(lobby_name=lobby_name, session_id=session_id, channel_name=channel_name)
        .select_related("session")
        .select_for_update(of=("self",))
        .first()
    )


# Administrator actions. Each takes effect at once for the people in the lobby
# and leaves an audit record naming the administrator.


def lobby_close(*, lobby_name: str, by: AbstractBaseUser) -> list[str] | None:
    """Close the lobby: everyone in it is told and disconnected, their stays
    end (the history is kept), and no one may join until it is reopened.

    Returns the ids of the sessions that were in it, or None if it was closed already.
    """
    with transaction.atomic():
        lobby = _lock_lobby(lobby_name)
        if lobby is None or lobby.closed_at is not None:
            return None
        now = timezone.now()
        lobby.closed_at = now
        lobby.save(update_fields=["closed_at"])
        live = Membership.objects.filter(lobby=lobby, left_at__isnull=True)
        session_ids = [str(session_id) for session_id in live.values_list("session_id", flat=True)]
        # One event for everyone instead of a peer_left each: every connection is closing.
        live.update(left_at=now, state=Membership.State.LEFT)
        Session.objects.filter(pk__in=session_ids).update(last_seen_at=now)
        publish(lobby_name, {"type": "lobby.closed"})
        _roster_changed(lobby)
        _audit("lobby_close", by, lobby, session_ids)
    return session_ids


def lobby_reopen(*, lobby_name: str, by: AbstractBaseUser) -> bool:
    """Let people join a closed lobby again. Returns whether it was closed."""
    with transaction.atomic():
        lobby = _lock_lobby(lobby_name)
        if lobby is None or lobby.closed_at is None:
            return False
        lobby.closed_at = None
        lobby.save(update_fields=["closed_at"])
        _audit("lobby_reopen", by, lobby, [])
    return True


def membership_kick(*, membership_id: int, by: AbstractBaseUser) -> LobbyBan | None:
    """Remove a participant: its connection is told and closed, the others see
    it leave, and its session may not rejoin for LOBBY_KICK_SECONDS.

    Returns the ban, or None if the stay had already ended.
    """
    with transaction.atomic():
        locked = _lock_live_membership(membership_id)
        if locked is None:
            return None
        lobby, membership = locked
        now = timezone.now()
        seconds = settings.LOBBY_KICK_SECONDS
        ban = LobbyBan.objects.create(
            lobby=lobby, session_id=membership.session_id, until=now + timedelta(seconds=seconds), created_by=by
        )
        tell_channel(membership.channel_name, {"type": "lobby.kicked", "seconds": seconds})
        _depart({lobby.name: lobby}, ended=[membership], dropped=[], now=now)
        _audit("membership_kick", by, lobby, [str(membership.session_id)])
    return ban


def membership_mute(*, membership_id: int, by: AbstractBaseUser) -> bool:
    """Mark a participant muted, as its own `mute` would: everyone, the
    participant included, receives peer_updated. Returns whether it was still there."""
    with transaction.atomic():
        locked = _lock_live_membership(membership_id)
        if locked is None:
            return False
        lobby, membership = locked
        _set_muted(lobby, membership, True)
        _audit("membership_mute", by, lobby, [str(membership.session_id)])
    return True


def _lock_live_membership(membership_id: int) -> tuple[Lobby, Membership] | None:
    """Lock a live membership and its lobby, the lobby first as every roster change does."""
    lobby_name = Membership.objects.filter(pk=membership_id).values_list("lobby__name", flat=True).first()
    if lobby_name is None:
        return None
    lobby = _lock_lobby(lobby_name)
    if lobby is None:
        return None
    membership = (
        Membership.objects.select_related("session")
        .select_for_update(of=("self",))
        .filter(pk=membership_id, lobby=lobby, left_at__isnull=True)
        .first()
    )
    return None if membership is None else (lobby, membership)


def _audit(action: str, by: AbstractBaseUser, lobby: Lobby, session_ids: list[str]) -> None:
    """One record per administrator action, for whoever has to answer "who did
    that?": an AuditEvent and a voicebot.audit line, once the transaction that
    made the change has committed (a failure to record it does not undo it)."""
    record = partial(
        audit_record,
        action=action,
        user=by,
        ip=client_address.get(),
        lobby=lobby.name,
        detail={"lobby_id": lobby.pk, "session_ids": session_ids},
    )
    transaction.on_commit(record, robust=True)


# Chat. Every message is stored before anyone receives it, so a client that
# missed some (it was reconnecting) fetches them with chat_history.


class NotInLobby(Exception):
    """The connection holds no place in the lobby (any more)."""


@dataclass
class ChatRequest:
    """One chat message from a connection (see chat_send)."""

    lobby_name: str
    session_id: str
    channel_name: str
    text: str
    # time.time() when it arrived, for the delivery latency metric.
    received_at: float | None = None


def chat_send(
    *, lobby_name: str, session_id: str, channel_name: str, text: str, received_at: float | None = None
) -> ChatMessage:
    """Store a chat message from the connection holding the session's place in
    the lobby, then send it to everyone in the lobby, the sender included: the
    sender's own copy, which carries the message's id, is its acknowledgement.

    Raises NotInLobby if the connection holds no place; should the message not
    be stored, whatever the database raises, and no one receives it.
    """
    request = ChatRequest(
        lobby_name=lobby_name, session_id=session_id, channel_name=channel_name, text=text, received_at=received_at
    )
    outcome = chat_send_many(requests=[request])[0]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def chat_send_many(*, requests: list[ChatRequest]) -> list[ChatMessage | Exception]:
    """chat_send for many messages at once, in one transaction: each request's
    stored message, or NotInLobby. Ids grow, and everyone receives the
    messages, in the order given. An error of the database fails them all.

    One message at a time, a busy room's chat queued behind each message's
    round trips to Postgres (3-6 ms each under load), and its receivers
    waited tens of milliseconds in bursts.
    """
    connections = [
        (request.lobby_name, uuid.UUID(str(request.session_id)), request.channel_name) for request in requests
    ]
    memberships = selectors.connection_memberships(connections)
    outcomes: list[ChatMessage | Exception] = []
    for request, key in zip(requests, connections):
        membership = memberships.get(key)
        if membership is None:
            outcomes.append(NotInLobby(request.lobby_name))
        else:
            outcomes.append(ChatMessage(
                lobby_id=membership.lobby_id,
                session_id=membership.session_id,
                author_name=membership.session.name,
                text=request.text,
            ))
    # Committed durably (unlike roster changes): the sender's copy promises
    # that the message is kept. bulk_create gives each message its id.
    with transaction.atomic():
        ChatMessage.objects.bulk_create([outcome for outcome in outcomes if isinstance(outcome, ChatMessage)])
        for request, outcome in zip(requests, outcomes):
            if isinstance(outcome, ChatMessage):
                frame = selectors.chat_frame(outcome)
                publish(request.lobby_name, {"type": "lobby.deliver", "frame": frame, "received_at": request.received_at})
    return outcomes


def chat_prune(*, limit: int = 1000) -> int:
    """Delete up to `limit` of the chat messages older than CHAT_RETENTION_DAYS,
    oldest first. Returns how many went; call again while that is `limit`.

    In batches, so that no single statement holds the database (and the
    server process's database thread) for long."""
    cutoff = timezone.now() - timedelta(days=settings.CHAT_RETENTION_DAYS)
    expired = ChatMessage.objects.filter(created_at__lt=cutoff).order_by("id").values_list("id", flat=True)
    deleted, _ = ChatMessage.objects.filter(pk__in=list(expired[:limit])).delete()
    return deleted
