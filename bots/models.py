import os
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from bots import config
from lobbies.models import Lobby, Session

# A response cache lifetime for bots that leave it blank and answer offline:
# the offline responder is deterministic, so its answers never go stale.
OFFLINE_CACHE_SECONDS = 3600


class Provider(models.Model):
    """An AI service bots talk to: a language model, or speech endpoints.

    The API key itself is never stored in the database: it is read, when a
    bot starts, from the named environment variable or secret file.
    """

    class Kind(models.TextChoices):
        OFFLINE = config.OFFLINE, "Offline responder (no network)"
        OPENAI = config.OPENAI, "OpenAI-compatible (OpenAI, llama.cpp, Ollama, vLLM…)"
        ANTHROPIC = config.ANTHROPIC, "Anthropic Messages API"

    name = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.OFFLINE)
    base_url = models.URLField(
        blank=True, help_text="For example http://127.0.0.1:11434/v1 for Ollama. Empty uses the vendor's own."
    )
    api_key_env = models.CharField(
        "API key environment variable", max_length=128, blank=True, help_text="For example OPENAI_API_KEY."
    )
    api_key_file = models.CharField(
        "API key file", max_length=500, blank=True, help_text="A file on the worker machines that holds only the key."
    )
    timeout_seconds = models.FloatField(default=10.0, validators=[MinValueValidator(0.1), MaxValueValidator(300)])
    max_retries = models.PositiveSmallIntegerField(default=2, validators=[MaxValueValidator(10)])

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        if self.api_key_env and self.api_key_file:
            raise ValidationError("Give the API key either as an environment variable or as a file, not both.")

    def api_key(self) -> str:
        """The key, read now from where the provider says it is ("" for none)."""
        if self.api_key_env:
            return os.environ.get(self.api_key_env, "")
        if self.api_key_file:
            try:
                return Path(self.api_key_file).read_text().strip()
            except OSError:
                return ""
        return ""

    def settings(self) -> config.ProviderSettings:
        return config.ProviderSettings(
            name=self.name,
            kind=self.kind,
            base_url=self.base_url,
            api_key=self.api_key(),
            timeout_seconds=self.timeout_seconds,
            max_retries=self.max_retries,
        )


class Bot(models.Model):
    """An AI voice bot: who it is, which provider answers for it, and how it speaks."""

    name = models.CharField(max_length=64, unique=True, help_text="Shown to people in the room.")
    enabled = models.BooleanField(default=True, help_text="A disabled bot leaves every lobby.")
    provider = models.ForeignKey(
        Provider, on_delete=models.PROTECT, related_name="bots", help_text="The language model provider."
    )
    model_name = models.CharField(max_length=128, blank=True, help_text="For example gpt-4o-mini or claude-haiku-4-5.")
    system_prompt = models.TextField("personality", blank=True, help_text="The system prompt.")
    greeting = models.CharField(
        max_length=500, blank=True, help_text="Said to each person who joins; {name} is replaced by their name."
    )
    speech_provider = models.ForeignKey(
        Provider,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="speaking_bots",
        limit_choices_to={"kind": config.OPENAI},
        help_text="An OpenAI-compatible provider for speech recognition and synthesis. "
        "Empty: offline, with faster-whisper and eSpeak NG.",
    )
    voice = models.CharField(max_length=64, default="en-us", help_text="An eSpeak NG voice, or the provider's voice name.")
    language = models.CharField(max_length=16, default="en")
    max_lobbies = models.PositiveSmallIntegerField(
        "max concurrent lobbies", default=3, validators=[MinValueValidator(1)]
    )
    temperature = models.FloatField(default=0.7, validators=[MinValueValidator(0), MaxValueValidator(2)])
    max_reply_tokens = models.PositiveSmallIntegerField(default=150, validators=[MinValueValidator(1)])
    max_reply_chars = models.PositiveSmallIntegerField(default=600, validators=[MinValueValidator(20)])
    context_turns = models.PositiveSmallIntegerField(
        default=12, help_text="How many past turns, spoken and chat, go to the model."
    )
    cache_seconds = models.PositiveIntegerField(
        "response cache seconds",
        null=True,
        blank=True,
        help_text="Empty: an hour for the offline responder, off for the others. 0 turns it off.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def response_cache_seconds(self) -> int:
        if self.cache_seconds is not None:
            return self.cache_seconds
        return OFFLINE_CACHE_SECONDS if self.provider.kind == config.OFFLINE else 0

    def profile(self) -> config.BotProfile:
        speech_provider = self.speech_provider.settings() if self.speech_provider else None
        return config.BotProfile(
            bot_id=self.pk,
            name=self.name,
            provider=self.provider.settings(),
            model_name=self.model_name,
            system_prompt=self.system_prompt,
            greeting=self.greeting,
            speech=config.SpeechSettings(provider=speech_provider, voice=self.voice, language=self.language),
            temperature=self.temperature,
            max_reply_tokens=self.max_reply_tokens,
            max_reply_chars=self.max_reply_chars,
            context_turns=self.context_turns,
            cache_seconds=self.response_cache_seconds(),
        )


class Worker(models.Model):
    """A running bot worker process (`manage.py runbots`, or the server itself on
    the embedded default). One that stops sending heartbeats is taken for dead."""

    name = models.CharField(max_length=200, unique=True)
    hostname = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    capacity = models.PositiveSmallIntegerField()
    started_at = models.DateTimeField(auto_now_add=True)
    heartbeat_at = models.DateTimeField(default=timezone.now, db_index=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return self.name


class Assignment(models.Model):
    """A bot's presence in a lobby, from the admin adding it until it is removed.

    A worker claims the assignment and runs the bot; while the worker sends
    heartbeats nobody else may. Rows with `removed_at` set are history.
    """

    class Status(models.TextChoices):
        PENDING = "pending", "waiting for a worker"
        STARTING = "starting"
        IN_ROOM = "in_room", "in room"
        SPEAKING = "speaking"
        ERROR = "error"

    bot = models.ForeignKey(Bot, on_delete=models.CASCADE, related_name="assignments")
    lobby = models.ForeignKey(Lobby, on_delete=models.CASCADE, related_name="bot_assignments")
    # The bot's identity in this lobby; its token is replaced at every claim,
    # so only the claiming worker can connect as it.
    session = models.ForeignKey(Session, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    status_since = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(blank=True)
    worker = models.ForeignKey(Worker, null=True, blank=True, on_delete=models.SET_NULL, related_name="assignments")
    claimed_at = models.DateTimeField(null=True, blank=True)
    added_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    removed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "bot in a lobby"
        verbose_name_plural = "bots in lobbies"
        constraints = [
            models.UniqueConstraint(
                fields=["bot", "lobby"], condition=Q(removed_at__isnull=True), name="one_live_assignment_per_bot_and_lobby"
            )
        ]
        indexes = [models.Index(fields=["worker"], condition=Q(removed_at__isnull=True), name="live_assignments")]

    def __str__(self) -> str:
        return f"{self.bot} in {self.lobby}"


class Turn(models.Model):
    """One exchange of a bot's conversation in a lobby, with how long each stage took."""

    class Source(models.TextChoices):
        VOICE = "voice"
        CHAT = "chat"
        GREETING = "greeting"

    assignment = models.ForeignKey(Assignment, on_delete=models.CASCADE, related_name="turns")
    # Copied from the assignment so history and analytics filter without joins.
    bot = models.ForeignKey(Bot, on_delete=models.CASCADE, related_name="turns")
    lobby = models.ForeignKey(Lobby, on_delete=models.CASCADE, related_name="bot_turns")
    source = models.CharField(max_length=16, choices=Source.choices)
    speaker_name = models.CharField(max_length=64, blank=True)
    speaker_session_id = models.UUIDField(null=True, blank=True)
    user_text = models.TextField(blank=True)
    reply_text = models.TextField(blank=True)
    error = models.TextField(blank=True)
    interrupted = models.BooleanField(default=False, help_text="Someone started talking over the reply.")
    # Milliseconds; empty where the stage did not run.
    end_of_speech_ms = models.FloatField(null=True, blank=True, help_text="Silence waited to know the speaker finished.")
    recognition_ms = models.FloatField(null=True, blank=True)
    model_first_token_ms = models.FloatField(null=True, blank=True)
    synthesis_first_audio_ms = models.FloatField(null=True, blank=True)
    first_audio_ms = models.FloatField(
        null=True, blank=True, help_text="From the end of the person's speech to the bot's first audio."
    )
    barge_in_ms = models.FloatField(null=True, blank=True, help_text="From the interruption to the bot falling silent.")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["bot", "created_at"], name="turns_by_bot")]

    def __str__(self) -> str:
        return f"{self.bot} in {self.lobby} at {self.created_at:%Y-%m-%d %H:%M:%S}"
