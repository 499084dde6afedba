"""Plain settings objects that the bot runtime works from.

The runtime (speech, language models, the voice pipeline) takes these instead
of model instances, so it never touches the database and can run in tests and
benchmarks without one. `bots.selectors` builds them from the models.
"""

from dataclasses import dataclass, field

# Provider kinds (Provider.kind).
OFFLINE = "offline"
OPENAI = "openai"
ANTHROPIC = "anthropic"


@dataclass(frozen=True)
class ProviderSettings:
    """How to reach one AI provider. `api_key` is resolved from the
    environment or a secret file just before use and is never logged."""

    name: str
    kind: str  # OFFLINE, OPENAI or ANTHROPIC
    base_url: str = ""
    api_key: str = field(default="", repr=False)
    timeout_seconds: float = 10.0
    max_retries: int = 2


@dataclass(frozen=True)
class SpeechSettings:
    """Speech recognition and synthesis for one bot. With no provider both run
    offline (faster-whisper and eSpeak NG); with an OpenAI-compatible provider
    they use its /audio/transcriptions and /audio/speech endpoints."""

    provider: ProviderSettings | None = None
    recognition_model: str = "whisper-1"
    synthesis_model: str = "tts-1"
    voice: str = "en-us"
    language: str = "en"


@dataclass(frozen=True)
class BotProfile:
    """Everything a bot needs to hold a conversation in one lobby."""

    bot_id: int
    name: str
    provider: ProviderSettings
    model_name: str = ""
    system_prompt: str = ""
    greeting: str = ""
    speech: SpeechSettings = SpeechSettings()
    temperature: float = 0.7
    max_reply_tokens: int = 150
    # The reply is cut at a sentence end past this many characters.
    max_reply_chars: int = 600
    # How many past turns (voice and chat) go to the model.
    context_turns: int = 12
    # Response cache lifetime; 0 turns it off.
    cache_seconds: int = 0
