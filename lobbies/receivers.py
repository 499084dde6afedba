"""Keeps the in-process caches honest when sessions and bans change by any
route (services, the admin, the shell)."""

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from lobbies.cache import invalidate_everywhere, shared
from lobbies.models import LobbyBan, Session
from lobbies.selectors import bans_cache_key, session_cache_key


@receiver(post_save, sender=Session)
@receiver(post_delete, sender=Session)
def forget_cached_session(sender: type[Session], instance: Session, created: bool = False, **kwargs: Any) -> None:
    # A new session is cached by session_create itself.
    if not created:
        key = session_cache_key(instance.token_hash)
        shared.delete(key)
        invalidate_everywhere(key)


@receiver(post_save, sender=LobbyBan)
@receiver(post_delete, sender=LobbyBan)
def forget_cached_bans(sender: type[LobbyBan], instance: LobbyBan, **kwargs: Any) -> None:
    invalidate_everywhere(bans_cache_key(instance.lobby_id))

