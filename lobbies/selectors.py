"""Reads of sessions and lobbies, shaped the way the API and protocol send them."""

import hashlib
from typing import TypedDict

from django.conf import settings
from django.db.models import Count, Q, QuerySet

from lobbies.models import Lobby, Membership, Session


class Peer(TypedDict):
    peer_id: str
    name: str
    bot: bool
    muted: bool
    state: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def session_for_token(token: str) -> Session | None:
    if not token:
        return None
    return Session.objects.filter(token_hash=token_hash(token)).first()


def peer_of(membership: Membership) -> Peer:
    return {
        "peer_id": str(membership.session_id),
        "name": membership.session.name,
        "bot": membership.session.is_bot,
        "muted": membership.muted,
        "state": membership.state,
    }


def live_memberships(lobby: Lobby) -> QuerySet[Membership]:
    return lobby.memberships.filter(left_at__isnull=True).select_related("session")


def lobby_list(*, viewer: Session | None) -> list[dict]:
    """Public lobbies, and the viewer's own private ones, busiest first."""
    visible = Q(private=False)
    if viewer is not None:
        visible |= Q(created_by=viewer)
    lobbies = (
        Lobby.objects.filter(visible)
        .annotate(participant_count=Count("memberships", filter=Q(memberships__left_at__isnull=True)))
        .order_by("-participant_count", "-last_active_at")[: settings.LOBBY_LIST_LIMIT]
    )
    return [lobby_summary(lobby, lobby.participant_count) for lobby in lobbies]


def lobby_summary(lobby: Lobby, participant_count: int) -> dict:
    return {
        "name": lobby.name,
        "private": lobby.private,
        "max_participants": lobby.max_participants,
        "participant_count": participant_count,
    }


def lobby_detail(*, name: str) -> dict | None:
    lobby = Lobby.objects.filter(name=name).first()
    if lobby is None:
        return None
    participants = [peer_of(membership) for membership in live_memberships(lobby)]
    return {**lobby_summary(lobby, len(participants)), "participants": participants}
