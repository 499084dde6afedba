import uuid

from django.conf import settings
from django.contrib.auth.hashers import check_password, make_password
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

# Letters and digits of any script, "-" and "_": safe in a URL path segment
# and easy to read out loud. The Hangul fillers are letters that show as
# nothing, so they are left out.
LOBBY_NAME_PATTERN = r"^(?:[^\W\u115f\u1160\u3164\uffa0]|-){1,64}\Z"
# Lobby passwords are kept only as a hash; this bounds the work of hashing one.
LOBBY_PASSWORD_MAX_LENGTH = 128


def default_max_participants() -> int:
    return settings.LOBBY_DEFAULT_MAX_PARTICIPANTS


def validate_max_participants(value: int) -> None:
    # Read at call time so that changing the limit needs no migration.
    limit = settings.LOBBY_MAX_PARTICIPANTS_LIMIT
    if not 1 <= value <= limit:
        raise ValidationError(f"Must be from 1 to {limit}.")


class Session(models.Model):
    """A person's (or a bot's) identity in the service.

    The `id` is the peer id others see. The resume token is shown to its
    owner once, at creation, and only its SHA-256 is kept.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=64)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    is_bot = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name


class Lobby(models.Model):
    """A voice room. Joining a name that does not exist creates it."""

    name = models.CharField(
        max_length=64,
        unique=True,
        validators=[RegexValidator(LOBBY_NAME_PATTERN, "Use letters, digits, '-' and '_' only.")],
    )
    created_by = models.ForeignKey(
        Session, null=True, blank=True, on_delete=models.SET_NULL, related_name="created_lobbies"
    )
    private = models.BooleanField(default=False, help_text="Private lobbies are not listed to others.")
    max_participants = models.PositiveSmallIntegerField(
        default=default_max_participants, validators=[validate_max_participants]
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_active_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # Django's password hash, or "" for a lobby anyone may join. Never shown.
    password_hash = models.CharField(max_length=128, blank=True, editable=False)
    # Set by an administrator: a closed lobby is not listed and lets no one in.
    closed_at = models.DateTimeField(null=True, blank=True)
    # Replaced by every change to who is in the lobby. A cached roster carries
    # the stamp it was built at, and is used only while the row still has it.
    roster_stamp = models.UUIDField(default=uuid.uuid4, editable=False)

    class Meta:
        ordering = ["-last_active_at"]
        verbose_name_plural = "lobbies"

    def __str__(self) -> str:
        return self.name

    @property
    def has_password(self) -> bool:
        return bool(self.password_hash)

    def set_password(self, password: str | None) -> None:
        """Require `password` to join from now on; None lets anyone in. Call save() after."""
        self.password_hash = make_password(password) if password is not None else ""

    def password_matches(self, password: str) -> bool:
        return self.has_password and check_password(password, self.password_hash)


class Membership(models.Model):
    """A session's stay in a lobby. Rows with no `left_at` are the live roster;
    the others are the room's history.

    A connection that drops is `reconnecting`: it keeps its place for the
    resume grace period, and a new connection of the same session takes it up.
    """

    class State(models.TextChoices):
        CONNECTED = "connected"
        RECONNECTING = "reconnecting"
        LEFT = "left"

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="memberships")
    lobby = models.ForeignKey(Lobby, on_delete=models.CASCADE, related_name="memberships")
    state = models.CharField(max_length=16, choices=State.choices, default=State.CONNECTED)
    muted = models.BooleanField(default=False)
    # The consumer's channel, so signaling can be sent straight to the peer.
    channel_name = models.CharField(max_length=200, blank=True)
    joined_at = models.DateTimeField(auto_now_add=True)
    # Refreshed in batches while a server process holds the connection; a live
    # row that stops being refreshed belonged to a process that died.
    last_seen_at = models.DateTimeField(default=timezone.now)
    disconnected_at = models.DateTimeField(null=True, blank=True)
    left_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["joined_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["session", "lobby"],
                condition=Q(left_at__isnull=True),
                name="one_live_membership_per_session_and_lobby",
            )
        ]
        indexes = [
            models.Index(
                fields=["lobby", "joined_at"], condition=Q(left_at__isnull=True), name="live_roster"
            ),
            models.Index(
                fields=["state", "last_seen_at"], condition=Q(left_at__isnull=True), name="live_presence"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.session} in {self.lobby}"


class LobbyBan(models.Model):
    """An administrator removed `session` from `lobby`: it may not join again until `until`."""

    lobby = models.ForeignKey(Lobby, on_delete=models.CASCADE, related_name="bans")
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="lobby_bans")
    until = models.DateTimeField()
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["lobby", "session", "until"], name="ban_lookup")]

    def __str__(self) -> str:
        return f"{self.session} banned from {self.lobby} until {self.until:%Y-%m-%d %H:%M}"


class ChatMessage(models.Model):
    """A chat message the server accepted. Its `id` is the cursor clients fetch
    missed messages after: ids grow in the order messages are stored."""

    lobby = models.ForeignKey(Lobby, on_delete=models.CASCADE, related_name="chat_messages")
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="chat_messages")
    # The author's name when it was sent: that is what everyone saw.
    author_name = models.CharField(max_length=64)
    text = models.TextField()
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["lobby", "id"], name="chat_history")]

    def __str__(self) -> str:
        return f"{self.author_name} in {self.lobby_id}: {self.text[:40]}"
