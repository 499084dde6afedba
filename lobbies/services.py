"""Writes to sessions and lobbies.

Every change that others in a lobby must hear of is published here, once the
transaction has committed, to the lobby's channel-layer group. Consumers only
relay what they receive; they never publish state changes themselves.
"""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from lobbies.models import Lobby, Membership, Session
from lobbies.publisher import publisher
from lobbies.selectors import Peer, live_memberships, peer_of, token_hash


class LobbyNameTaken(Exception):
    pass


class LobbyFull(Exception):
    pass


@dataclass
class JoinResult:
    lobby: Lobby
    peer: Peer
    # The others already in the lobby, each with the channel that reaches it.
    peers: list[tuple[Peer, str]]


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
    return session, token


def lobby_create(*, name: str, private: bool, max_participants: int, created_by: Session) -> Lobby:
    try:
        with transaction.atomic():
            return Lobby.objects.create(
                name=name, private=private, max_participants=max_participants, created_by=created_by
            )
    except IntegrityError:
        raise LobbyNameTaken(name)


@transaction.atomic
def lobby_join(*, lobby_name: str, session: Session, channel_name: str) -> JoinResult:
    """Put `session` in the lobby (creating a public lobby of that name if needed).

    A session already in the lobby through another connection is moved to
    this one: the old connection is closed and the others see it leave and
    join again, so they rebuild their peer connection to it.
    """
    # The row lock serialises joins of one lobby, so two cannot both take its last place.
    lobby, _ = Lobby.objects.select_for_update().get_or_create(
        name=lobby_name, defaults={"created_by": session}
    )

    roster = list(live_memberships(lobby))
    previous = next((m for m in roster if m.session_id == session.pk), None)
    others = [m for m in roster if m.session_id != session.pk]
    if len(others) >= lobby.max_participants:
        raise LobbyFull(lobby_name)

    now = timezone.now()
    if previous is not None:
        _end_membership(previous, lobby_name, now)
        tell_channel(previous.channel_name, {"type": "lobby.replaced"})

    membership = Membership.objects.create(session=session, lobby=lobby, channel_name=channel_name)
    Lobby.objects.filter(pk=lobby.pk).update(last_active_at=now)
    Session.objects.filter(pk=session.pk).update(last_seen_at=now)

    peer = peer_of(membership)
    publish(lobby_name, {"type": "lobby.peer_joined", "peer": peer, "channel": channel_name})
    return JoinResult(
        lobby=lobby, peer=peer, peers=[(peer_of(m), m.channel_name) for m in others]
    )


def lobby_leave(*, lobby_name: str, session_id: str, channel_name: str) -> None:
    """End the session's stay in the lobby, if `channel_name` still holds it."""
    with transaction.atomic():
        membership = _live_membership(lobby_name, session_id, channel_name)
        if membership is None:
            return
        now = timezone.now()
        _end_membership(membership, lobby_name, now)
        Session.objects.filter(pk=session_id).update(last_seen_at=now)


def _end_membership(membership: Membership, lobby_name: str, now: datetime) -> None:
    membership.left_at = now
    membership.state = Membership.State.LEFT
    membership.save(update_fields=["left_at", "state"])
    publish(
        lobby_name,
        {"type": "lobby.peer_left", "peer_id": str(membership.session_id), "channel": membership.channel_name},
    )


def membership_set_muted(*, lobby_name: str, session_id: str, channel_name: str, muted: bool) -> None:
    with transaction.atomic():
        membership = _live_membership(lobby_name, session_id, channel_name)
        if membership is None or membership.muted == muted:
            return
        membership.muted = muted
        membership.save(update_fields=["muted"])
        publish(lobby_name, {"type": "lobby.peer_updated", "peer": peer_of(membership)})


def _live_membership(lobby_name: str, session_id: str, channel_name: str) -> Membership | None:
    """The membership held by one connection, locked for the rest of the transaction."""
    return (
        Membership.objects.select_related("session")
        .select_for_update()
        .filter(
            lobby__name=lobby_name,
            session_id=session_id,
            channel_name=channel_name,
            left_at__isnull=True,
        )
        .first()
    )
