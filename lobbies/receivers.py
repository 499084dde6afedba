"""Keeps the in-process caches honest when sessions change by any route
(services, the admin, the shell)."""

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from lobbies.cache import invalidate_everywhere
from lobbies.models import Session
from lobbies.selectors import session_cache_key


@receiver(post_save, sender=Session)
@receiver(post_delete, sender=Session)
def forget_cached_session(sender: type[Session], instance: Session, created: bool = False, **kwargs: Any) -> None:
    # A new session cannot be cached anywhere yet.
    if not created:
        invalidate_everywhere(session_cache_key(instance.token_hash))
