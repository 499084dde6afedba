"""The bots' replies from a language model: OpenAI-compatible, Anthropic, or offline.

`reply_stream` is the one way in. Around each provider it adds what a live
voice conversation needs: streaming (speech starts before the reply is
complete), timeouts, retries with backoff, a circuit breaker per provider, a
response cache and a cut at a sentence end for long replies.

Error messages and logs never carry API keys: the SDKs' own error messages
can echo a rejected key, so they are replaced by short messages of our own.
"""

import asyncio
import hashlib
import json
import logging
import math
import random
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from bots import metrics
from bots.config import ANTHROPIC, OFFLINE, OPENAI, BotProfile, ProviderSettings

logger = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "user" | "assistant", "content": str}

_DEFAULT_BASE_URLS = {OPENAI: "https://api.openai.com/v1", ANTHROPIC: "https://api.anthropic.com"}

# Backoff before retry n (1, 2, ...) is up to BASE * 2**(n-1) seconds, capped.
_BACKOFF_BASE_SECONDS = 0.25
_BACKOFF_MAX_SECONDS = 4.0

# Anthropic needs alternating turns that start and end with the user; these
# stand in for a missing user turn.
OPENING_PLACEHOLDER = "(The conversation begins.)"
CONTINUE_PLACEHOLDER = "(Please go on.)"

# OpenAI-compatible servers without authentication (llama.cpp, Ollama, vLLM)
# ignore the key, but the SDK refuses to start without one.
_NO_KEY_PLACEHOLDER = "no-key"

_CACHE_KEY_PREFIX = "voicebot:llm-reply:"


class ProviderError(Exception):
    """A reply could not be had. str(error) is short and safe to show: no keys, no prompts."""


class ProviderUnavailable(ProviderError):
    """The provider's circuit breaker is open: the call was refused without reaching it."""


# --- public API -------------------------------------------------------------


async def reply_stream(*, bot: BotProfile, messages: list[Message]) -> AsyncIterator[str]:
    """Yields text deltas of the bot's reply to the conversation in `messages`.

    The system prompt is bot.system_prompt; bot.model_name, bot.temperature and
    bot.max_reply_tokens go to the provider (except temperature to Anthropic:
    the API version the SDK speaks rejects sampling parameters). A reply is
    cut at the first sentence end past bot.max_reply_chars.

    Each attempt may wait bot.provider.timeout_seconds for the first delta
    and as long between deltas. Failed attempts are retried with backoff,
    up to bot.provider.max_retries more times, but only until the first delta
    has been yielded; after that a failure raises ProviderError at once.

    With bot.cache_seconds > 0, a reply to the same context is answered from
    the cache as one delta, and every complete reply is stored (Bot sets it
    on by default for the offline responder only).
    """
    streamer = _STREAMERS.get(bot.provider.kind)
    if streamer is None:
        raise ProviderError(f"{bot.provider.name}: unknown provider kind {bot.provider.kind!r}")
    cache_key = _response_cache_key(bot, messages) if bot.cache_seconds > 0 else ""
    if cache_key:
        cached = await _cache_get(cache_key)
        if cached is not None:
            yield cached
            return

    breaker = _breaker_for(bot.provider)
    is_trial = breaker.admit(bot.provider)
    parts: list[str] = []
    success: bool | None = None  # stays None when the caller stops listening first
    try:
        deltas = _cut_at_sentence_end(_with_retries(bot, messages, streamer), bot.max_reply_chars)
        async with aclosing(deltas):
            async for delta in deltas:
                parts.append(delta)
                yield delta
        success = True
    except ProviderError:
        success = False
        metrics.provider_failed(bot.provider.kind)
        raise
    finally:
        if success is None and parts:
            success = True  # the provider was answering when the caller stopped listening
        breaker.finish(bot.provider, success, is_trial)
    if cache_key and parts:
        await _cache_set(cache_key, "".join(parts), bot.cache_seconds)


async def reply_text(*, bot: BotProfile, messages: list[Message]) -> str:
    """The whole reply at once."""
    deltas = reply_stream(bot=bot, messages=messages)
    async with aclosing(deltas):
        return "".join([delta async for delta in deltas])


def breaker_state(provider: ProviderSettings) -> str:
    """The provider's circuit breaker in this process: "closed", "open" or "half_open"."""
    breaker = _breakers.get(_breaker_key(provider))
    return breaker.state() if breaker else "closed"


# --- attempts, timeouts and retries -------------------------------------------

_Streamer = Callable[[BotProfile, list[Message]], AsyncIterator[str]]


class _IncompleteReply(Exception):
    """The provider's stream ended without saying the reply was complete."""


async def _with_retries(bot: BotProfile, messages: list[Message], streamer: _Streamer) -> AsyncIterator[str]:
    provider = bot.provider
    attempts = provider.max_retries + 1
    for attempt in range(1, attempts + 1):
        started = False
        try:
            deltas = _with_timeouts(streamer(bot, messages), provider.timeout_seconds)
            async with aclosing(deltas):
                async for delta in deltas:
                    started = True
                    yield delta
            return
        except Exception as error:
            message, retryable = _describe_failure(provider, error)
            if started or not retryable or attempt == attempts:
                logger.warning("Provider %s failed (attempt %d of %d): %s", provider.name, attempt, attempts, message)
                # Not chained: the SDK error's own message may hold the key.
                raise ProviderError(f"{provider.name}: {message}") from None
            delay = _backoff_seconds(attempt)
            logger.info(
                "Provider %s failed (attempt %d of %d): %s; retrying in %.2f s",
                provider.name, attempt, attempts, message, delay,
            )
            await asyncio.sleep(delay)


async def _with_timeouts(deltas: AsyncIterator[str], limit: float) -> AsyncIterator[str]:
    """Raises TimeoutError when the first delta (connecting included) or any next one takes over `limit`.

    Our own clock rather than the HTTP client's read timeout, which a server
    sending keep-alive bytes without any text would never trip.
    """
    async with aclosing(deltas):
        while True:
            try:
                async with asyncio.timeout(limit):
                    delta = await anext(deltas)
            except StopAsyncIteration:
                return
            yield delta


def _backoff_seconds(attempt: int) -> float:
    ceiling = min(_BACKOFF_MAX_SECONDS, _BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
    # Jitter keeps bots that failed together from retrying together.
    return ceiling * random.uniform(0.5, 1.0)


def _describe_failure(provider: ProviderSettings, error: Exception) -> tuple[str, bool]:
    """A safe message for the failure, and whether another attempt may succeed."""
    if isinstance(error, TimeoutError):
        return f"no answer within {provider.timeout_seconds:g} s", True
    if isinstance(error, _IncompleteReply):
        return "the reply stream ended early", True
    sdk = _sdk_module(provider.kind)
    if sdk is not None:
        if isinstance(error, sdk.APITimeoutError):
            return f"no answer within {provider.timeout_seconds:g} s", True
        if isinstance(error, sdk.APIConnectionError):
            return "could not connect", True
        if isinstance(error, sdk.APIStatusError):
            status = error.status_code
            if status < 400:  # an error event inside a stream that had started fine
                return "the provider reported an error mid-stream", True
            return f"the provider answered HTTP {status}", status in (408, 409, 429) or status >= 500
    return f"unexpected error ({type(error).__name__})", False


# --- circuit breaker ------------------------------------------------------------


@dataclass
class _Breaker:
    """Opens after BOT_BREAKER_FAILURES failed calls in a row; after
    BOT_BREAKER_RESET_SECONDS lets one trial call through, which closes it again
    on success or reopens it on failure."""

    failures: int = 0
    opened_at: float | None = None
    trial_running: bool = False

    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        if self.trial_running or self.open_for() >= settings.BOT_BREAKER_RESET_SECONDS:
            return "half_open"
        return "open"

    def open_for(self) -> float:
        return time.monotonic() - self.opened_at if self.opened_at is not None else 0.0

    def admit(self, provider: ProviderSettings) -> bool:
        """Lets a call through, returning whether it is the half-open trial; raises ProviderUnavailable."""
        state = self.state()
        if state == "closed":
            return False
        if state == "half_open" and not self.trial_running:
            self.trial_running = True
            return True
        wait = max(0.0, settings.BOT_BREAKER_RESET_SECONDS - self.open_for())
        raise ProviderUnavailable(
            f"{provider.name}: unavailable after repeated failures; trying again in {wait:.0f} s"
        )

    def finish(self, provider: ProviderSettings, success: bool | None, is_trial: bool) -> None:
        """Records a call's outcome; None for a call abandoned before any outcome."""
        if is_trial:
            self.trial_running = False
        if success is True:
            if self.opened_at is not None:
                logger.info("Provider %s answers again; circuit breaker closed", provider.name)
            self.failures = 0
            self.opened_at = None
        elif success is False:
            self.failures += 1
            if is_trial or (self.opened_at is None and self.failures >= settings.BOT_BREAKER_FAILURES):
                self.opened_at = time.monotonic()
                logger.warning(
                    "Provider %s failed %d times in a row; circuit breaker open for %s s",
                    provider.name, self.failures, settings.BOT_BREAKER_RESET_SECONDS,
                )


_breakers: dict[tuple[str, str, str], _Breaker] = {}


def _breaker_key(provider: ProviderSettings) -> tuple[str, str, str]:
    return (provider.kind, provider.name, provider.base_url)


def _breaker_for(provider: ProviderSettings) -> _Breaker:
    return _breakers.setdefault(_breaker_key(provider), _Breaker())


# --- response cache ---------------------------------------------------------------


def _response_cache_key(bot: BotProfile, messages: list[Message]) -> str:
    material = [
        bot.bot_id,
        bot.provider.kind,
        bot.provider.base_url,
        bot.model_name,
        bot.system_prompt,
        bot.temperature,
        bot.max_reply_tokens,
        bot.max_reply_chars,  # the stored text was cut to it
        messages,
    ]
    digest = hashlib.sha256(json.dumps(material, ensure_ascii=False).encode()).hexdigest()
    return _CACHE_KEY_PREFIX + digest


async def _cache_get(key: str) -> str | None:
    try:
        return await cache.aget(key)
    except Exception as error:  # a cache that is down must not cost the reply
        logger.warning("Response cache read failed: %r", error)
        return None


async def _cache_set(key: str, text: str, seconds: int) -> None:
    try:
        await cache.aset(key, text, timeout=seconds)
    except Exception as error:
        logger.warning("Response cache write failed: %r", error)


# --- reply length -------------------------------------------------------------------

# A sentence ends at . ! or ? followed by white space; "3.14" goes on.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s)")


def _sentence_end_past(text: str, limit: int) -> int | None:
    """The index just after the first sentence end at or past `limit` characters."""
    match = _SENTENCE_END.search(text, max(0, limit - 1))
    return match.end() if match else None


def _cut_text(text: str, limit: int) -> str:
    end = _sentence_end_past(text, limit)
    return text[:end] if end is not None else text


async def _cut_at_sentence_end(deltas: AsyncIterator[str], limit: int) -> AsyncIterator[str]:
    """Passes deltas on until the first sentence end past `limit` characters, then stops."""
    text = ""
    async with aclosing(deltas):
        async for delta in deltas:
            end = _sentence_end_past(text + delta, limit)
            if end is not None:
                # The end may lie in text already passed on (a "." whose following space just came).
                if end > len(text):
                    yield (text + delta)[len(text) : end]
                return
            text += delta
            yield delta


# --- providers --------------------------------------------------------------------------


def _sdk_module(kind: str) -> ModuleType | None:
    # Imported on first use: together the SDKs take about two seconds to import.
    if kind == OPENAI:
        import openai

        return openai
    if kind == ANTHROPIC:
        import anthropic

        return anthropic
    return None


# SDK clients hold connection pools, which belong to one event loop.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str, str], Any]] = (
    weakref.WeakKeyDictionary()
)


def _sdk_client(provider: ProviderSettings) -> Any:
    """A client per (kind, base URL, key), reused so connections are kept alive."""
    clients = _clients.setdefault(asyncio.get_running_loop(), {})
    key = (provider.kind, provider.base_url, provider.api_key)
    if key not in clients:
        sdk = _sdk_module(provider.kind)
        base_url = provider.base_url or _DEFAULT_BASE_URLS[provider.kind]
        if provider.kind == OPENAI:
            client_class, api_key = sdk.AsyncOpenAI, provider.api_key or _NO_KEY_PLACEHOLDER
        else:
            client_class, api_key = sdk.AsyncAnthropic, provider.api_key
        # Retries are ours (with the breaker and the first-delta rule), never the SDK's.
        clients[key] = client_class(
            base_url=base_url, api_key=api_key, timeout=provider.timeout_seconds, max_retries=0
        )
    return clients[key]


def _conversation(messages: list[Message]) -> list[Message]:
    """The context as alternating user and assistant turns, starting and ending with the user.

    In a room several people speak in a row; their lines are merged into one
    turn, which Anthropic and some local chat templates require.
    """
    turns: list[Message] = []
    for message in messages:
        role, content = message["role"], message["content"].strip()
        if not content:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1] = {"role": role, "content": turns[-1]["content"] + "\n" + content}
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": OPENING_PLACEHOLDER})
    if turns[-1]["role"] != "user":
        turns.append({"role": "user", "content": CONTINUE_PLACEHOLDER})
    return turns


async def _openai_deltas(bot: BotProfile, messages: list[Message]) -> AsyncIterator[str]:
    system = [{"role": "system", "content": bot.system_prompt}] if bot.system_prompt else []
    stream = await _sdk_client(bot.provider).chat.completions.create(
        model=bot.model_name,
        messages=system + _conversation(messages),
        temperature=bot.temperature,
        # max_tokens rather than max_completion_tokens: llama.cpp, Ollama and vLLM all take it.
        max_tokens=bot.max_reply_tokens,
        stream=True,
        timeout=bot.provider.timeout_seconds,
    )
    finished = False
    async with stream:
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.delta and choice.delta.content:
                yield choice.delta.content
            finished = finished or choice.finish_reason is not None
    if not finished:
        raise _IncompleteReply()


async def _anthropic_deltas(bot: BotProfile, messages: list[Message]) -> AsyncIterator[str]:
    options: dict[str, Any] = {"system": bot.system_prompt} if bot.system_prompt else {}
    stream = await _sdk_client(bot.provider).messages.create(
        model=bot.model_name,
        messages=_conversation(messages),
        max_tokens=bot.max_reply_tokens,
        stream=True,
        timeout=bot.provider.timeout_seconds,
        **options,
    )
    finished = False
    async with stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                yield event.delta.text
            elif event.type == "message_stop":
                finished = True
    if not finished:
        raise _IncompleteReply()


async def _offline_deltas(bot: BotProfile, messages: list[Message]) -> AsyncIterator[str]:
    # Word by word, as a remote model streams, so callers meet one behaviour.
    for word in re.findall(r"\S+\s*", offline_reply(bot=bot, messages=messages)):
        yield word
        await asyncio.sleep(0)


_STREAMERS: dict[str, _Streamer] = {OPENAI: _openai_deltas, ANTHROPIC: _anthropic_deltas, OFFLINE: _offline_deltas}


# --- offline responder ------------------------------------------------------------------

_CAPITALS: dict[str, tuple[str, str]] = {
    # country as said: (country as written, capital)
    "argentina": ("Argentina", "Buenos Aires"),
    "australia": ("Australia", "Canberra"),
    "austria": ("Austria", "Vienna"),
    "belgium": ("Belgium", "Brussels"),
    "brazil": ("Brazil", "Brasília"),
    "canada": ("Canada", "Ottawa"),
    "chile": ("Chile", "Santiago"),
    "china": ("China", "Beijing"),
    "denmark": ("Denmark", "Copenhagen"),
    "egypt": ("Egypt", "Cairo"),
    "england": ("England", "London"),
    "finland": ("Finland", "Helsinki"),
    "france": ("France", "Paris"),
    "germany": ("Germany", "Berlin"),
    "greece": ("Greece", "Athens"),
    "india": ("India", "New Delhi"),
    "indonesia": ("Indonesia", "Jakarta"),
    "ireland": ("Ireland", "Dublin"),
    "italy": ("Italy", "Rome"),
    "japan": ("Japan", "Tokyo"),
    "kenya": ("Kenya", "Nairobi"),
    "mexico": ("Mexico", "Mexico City"),
    "netherlands": ("the Netherlands", "Amsterdam"),
    "new zealand": ("New Zealand", "Wellington"),
    "nigeria": ("Nigeria", "Abuja"),
    "norway": ("Norway", "Oslo"),
    "peru": ("Peru", "Lima"),
    "poland": ("Poland", "Warsaw"),
    "portugal": ("Portugal", "Lisbon"),
    "russia": ("Russia", "Moscow"),
    "scotland": ("Scotland", "Edinburgh"),
    "south korea": ("South Korea", "Seoul"),
    "spain": ("Spain", "Madrid"),
    "sweden": ("Sweden", "Stockholm"),
    "switzerland": ("Switzerland", "Bern"),
    "thailand": ("Thailand", "Bangkok"),
    "turkey": ("Turkey", "Ankara"),
    "ukraine": ("Ukraine", "Kyiv"),
    "united kingdom": ("the United Kingdom", "London"),
    "uk": ("the United Kingdom", "London"),
    "united states": ("the United States", "Washington, D.C."),
    "usa": ("the United States", "Washington, D.C."),
    "america": ("the United States", "Washington, D.C."),
    "vietnam": ("Vietnam", "Hanoi"),
}

_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen".split()
    )
}
_TENS_WORDS = {
    word: 10 * value for value, word in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)
}
_UNITS = "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True))
_TENS = "|".join(_TENS_WORDS)
_NUMBER = rf"-?\d+(?:\.\d+)?|(?:{_TENS})(?:[- ](?:{_UNITS}))?|{_UNITS}"
_OPERATIONS: dict[str, Callable[[float, float], float]] = {
    "plus": lambda a, b: a + b,
    "minus": lambda a, b: a - b,
    "times": lambda a, b: a * b,
    "multiplied by": lambda a, b: a * b,
    "x": lambda a, b: a * b,
    "divided by": lambda a, b: a / b,
    "over": lambda a, b: a / b,
}
# Not \b at the start: it would read "-3" as "3".
_ARITHMETIC = re.compile(rf"(?<![\w.-])({_NUMBER}) ({'|'.join(_OPERATIONS)}) ({_NUMBER})\b")
_SYMBOLS = {"+": " plus ", "*": " times ", "×": " times ", "÷": " divided by ", "/": " divided by ", " - ": " minus "}

_SPEAKER_PREFIX = re.compile(r"^\s*([^:?\n]{1,40}):\s*(.*)$", re.DOTALL)
_ASKS_NAME = re.compile(r"\b(what(?:'s| is) your name|who are you|your name)\b")
_ASKS_TIME = re.compile(r"\b(what time|the time|time is it)\b")
_ASKS_DATE = re.compile(r"\b(what day|the date|today'?s date|what is today)\b")
_CAPITAL_OF = re.compile(r"\bcapital (?:city )?of (?:the )?(.+)")
_HOW_ARE_YOU = re.compile(r"\b(how are you|how's it going|how are things)\b")
_THANKS = re.compile(r"\b(thanks|thank you|cheers)\b")
_BYE = re.compile(r"\b(bye|goodbye|good night|see you)\b")
_GREETING = re.compile(r"^(hi|hello|hey|hiya|howdy|greetings|good (?:morning|afternoon|evening))\b")
_QUESTION_OPENING = re.compile(
    r"^(?:(?:so|well|and|okay|ok|um|uh|hey|please)\W+)*"
    r"(?:can you tell me about|tell me about|tell me|do you know|what is|what's|what are|who is|who's|who are|"
    r"where is|where's|where are|how do i|how do you|how does|how is|how are|why is|why are|why do|when is|"
    r"when did|can you|could you|please)\s+",
    re.IGNORECASE,
)
_POV_SWAPS = {"i": "you", "me": "you", "my": "your", "mine": "yours", "your": "my", "yours": "mine"}


def offline_reply(*, bot: BotProfile, messages: list[Message]) -> str:
    """The offline responder's answer to the last user message: rule-based, one to three sentences."""
    speaker, text = _last_user_line(messages)
    return _cut_text(_offline_answer(bot, speaker, text), bot.max_reply_chars)


def _last_user_line(messages: list[Message]) -> tuple[str, str]:
    """(speaker name or "", what they said) of the last user message."""
    for message in reversed(messages):
        if message["role"] == "user":
            match = _SPEAKER_PREFIX.match(message["content"])
            if match:
                return match.group(1).strip(), match.group(2).strip()
            return "", message["content"].strip()
    return "", ""


def _offline_answer(bot: BotProfile, speaker: str, text: str) -> str:
    said = re.sub(r"\s+", " ", text.lower()).strip()
    hello = f"Hello {speaker}!" if speaker else "Hello!"
    if not said:
        return f"{hello} I'm {bot.name}. Ask me about capitals, simple sums, or the time."
    if _ASKS_NAME.search(said):
        return f"My name is {bot.name}."
    if _ASKS_TIME.search(said):
        now = timezone.localtime()
        return f"It's {now.hour % 12 or 12}:{now.minute:02d} {'AM' if now.hour < 12 else 'PM'} ({now.tzname()})."
    if _ASKS_DATE.search(said):
        now = timezone.localtime()
        return f"Today is {now:%A}, {now.day} {now:%B %Y}."
    if match := _CAPITAL_OF.search(said):
        return _capital_answer(match.group(1))
    if answer := _arithmetic_answer(said):
        return answer
    if _HOW_ARE_YOU.search(said):
        return "I'm doing well, thanks for asking! How can I help?"
    if _THANKS.search(said):
        return "You're welcome! Anything else?"
    if _BYE.search(said):
        return f"Goodbye{' ' + speaker if speaker else ''}! It was nice talking with you."
    if _GREETING.match(said):
        return f"{hello} I'm {bot.name}. Ask me about capitals, simple sums, or the time."
    return f"You asked about {_topic_of(text)}. I'm an offline demo bot, so I can only answer simple questions."


def _capital_answer(place: str) -> str:
    place = re.sub(r"[^a-z .'-]", "", place).strip(" .")
    for key in sorted(_CAPITALS, key=len, reverse=True):
        if place == key or place.startswith(key + " "):
            country, capital = _CAPITALS[key]
            return f"The capital of {country} is {capital}" + ("" if capital.endswith(".") else ".")
    asked = " ".join(word.capitalize() for word in place.split()[:4])
    return f"Sorry, I don't know the capital of {asked}. I only know a few countries."


def _arithmetic_answer(said: str) -> str | None:
    for symbol, words in _SYMBOLS.items():
        said = said.replace(symbol, words)
    match = _ARITHMETIC.search(re.sub(r"\s+", " ", said))
    if not match:
        return None
    left, operation, right = _parse_number(match.group(1)), match.group(2), _parse_number(match.group(3))
    if operation in ("divided by", "over") and right == 0:
        return "Dividing by zero isn't defined, so I can't answer that one."
    result = _OPERATIONS[operation](left, right)
    if not all(math.isfinite(value) for value in (left, right, result)):
        return "Those numbers are too big for me, sorry."
    spoken = "times" if operation == "x" else operation
    return f"{_format_number(left)} {spoken} {_format_number(right)} is {_format_number(result)}."


def _parse_number(token: str) -> float:
    if token in _NUMBER_WORDS:
        return _NUMBER_WORDS[token]
    tens, _, unit = token.replace("-", " ").partition(" ")
    if tens in _TENS_WORDS:
        return _TENS_WORDS[tens] + _NUMBER_WORDS.get(unit, 0)
    return float(token)


def _format_number(value: float) -> str:
    if value == int(value):
        return str(int(value))
    return f"{round(value, 3):g}"


def _topic_of(text: str) -> str:
    """The question reflected back: its opening phrase dropped, pronouns turned round, kept short."""
    rest = _QUESTION_OPENING.sub("", text.strip()).rstrip(" ?!.")
    words = [_POV_SWAPS.get(word.lower(), word) for word in rest.split()]
    topic = " ".join(words[:12]) + (" …" if len(words) > 12 else "")
    return topic or "that"

