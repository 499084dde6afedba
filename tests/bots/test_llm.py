"""The bots' language-model side, against fake providers that speak the real wire formats."""

import asyncio
import dataclasses
import logging
import socket
import time

import pytest

from bots import llm
from bots.config import BotProfile
from tests.bots.conftest import FAKE_API_KEY, SYSTEM_PROMPT
from tests.bots.fake_providers import FakeAnthropic, FakeOpenAI

QUESTION = [{"role": "user", "content": "Alice: what is the capital of France?"}]

# A room: the bot greeted first, two people then spoke in a row.
ROOM_CONTEXT = [
    {"role": "assistant", "content": "Hello everyone, I'm Robo."},
    {"role": "user", "content": "Alice: hi Robo"},
    {"role": "user", "content": "Bob: hello"},
    {"role": "assistant", "content": "Hi Alice and Bob!"},
    {"role": "user", "content": "Alice: what is the capital of France?"},
]
ROOM_TURNS = [
    {"role": "user", "content": llm.OPENING_PLACEHOLDER},
    {"role": "assistant", "content": "Hello everyone, I'm Robo."},
    {"role": "user", "content": "Alice: hi Robo\nBob: hello"},
    {"role": "assistant", "content": "Hi Alice and Bob!"},
    {"role": "user", "content": "Alice: what is the capital of France?"},
]


async def collect(bot: BotProfile, messages: list[llm.Message] = QUESTION) -> list[str]:
    return [delta async for delta in llm.reply_stream(bot=bot, messages=messages)]


def quick(bot: BotProfile, timeout: float = 2.0, retries: int = 2, **changes) -> BotProfile:
    provider = dataclasses.replace(bot.provider, timeout_seconds=timeout, max_retries=retries)
    return dataclasses.replace(bot, provider=provider, **changes)


# --- OpenAI-compatible ----------------------------------------------------------


async def test_openai_reply_streams_in_pieces(openai_bot: BotProfile, fake_openai: FakeOpenAI) -> None:
    deltas = await collect(openai_bot)

    assert len(deltas) > 1
    assert "".join(deltas) == fake_openai.reply_text


async def test_openai_request_carries_the_profile_and_context(openai_bot: BotProfile, fake_openai: FakeOpenAI) -> None:
    await llm.reply_text(bot=openai_bot, messages=ROOM_CONTEXT)

    [request] = fake_openai.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {FAKE_API_KEY}"
    assert request.body["model"] == "gpt-test"
    assert request.body["temperature"] == 0.3
    assert request.body["max_tokens"] == 120
    assert request.body["stream"] is True
    assert request.body["messages"] == [{"role": "system", "content": SYSTEM_PROMPT}] + ROOM_TURNS


async def test_openai_without_a_key_still_answers(openai_bot: BotProfile, fake_openai: FakeOpenAI) -> None:
    """Local servers (llama.cpp, Ollama, vLLM) usually have no key."""
    bot = dataclasses.replace(openai_bot, provider=dataclasses.replace(openai_bot.provider, api_key=""))

    assert await llm.reply_text(bot=bot, messages=QUESTION) == fake_openai.reply_text


# --- Anthropic ----------------------------------------------------------------------


async def test_anthropic_reply_streams_in_pieces(anthropic_bot: BotProfile, fake_anthropic: FakeAnthropic) -> None:
    deltas = await collect(anthropic_bot)

    assert len(deltas) > 1
    assert "".join(deltas) == fake_anthropic.reply_text


async def test_anthropic_request_carries_the_profile_and_alternating_context(
    anthropic_bot: BotProfile, fake_anthropic: FakeAnthropic
) -> None:
    # The fake refuses what the real API refuses: turns that don't alternate from the user, sampling parameters.
    reply = await llm.reply_text(bot=anthropic_bot, messages=ROOM_CONTEXT)

    assert reply == fake_anthropic.reply_text
    [request] = fake_anthropic.requests
    assert request.path == "/v1/messages"
    assert request.body["model"] == "claude-test"
    assert request.body["system"] == SYSTEM_PROMPT
    assert request.body["max_tokens"] == 120
    assert request.body["stream"] is True
    assert request.body["messages"] == ROOM_TURNS
    assert "temperature" not in request.body


async def test_anthropic_context_ending_with_the_bot_gets_a_user_turn(
    anthropic_bot: BotProfile, fake_anthropic: FakeAnthropic
) -> None:
    context = [{"role": "assistant", "content": "Welcome!"}]

    assert await llm.reply_text(bot=anthropic_bot, messages=context) == fake_anthropic.reply_text
    roles = [message["role"] for message in fake_anthropic.requests[0].body["messages"]]
    assert roles == ["user", "assistant", "user"]


async def test_anthropic_overloaded_is_retried(anthropic_bot: BotProfile, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.fail_next(1, status=529)

    assert await llm.reply_text(bot=anthropic_bot, messages=QUESTION) == fake_anthropic.reply_text
    assert len(fake_anthropic.requests) == 2


# --- timeouts and retries -------------------------------------------------------------


async def test_a_silent_provider_times_out_on_every_attempt(openai_bot: BotProfile, fake_openai: FakeOpenAI) -> None:
    fake_openai.delay_seconds = 2.0
    bot = quick(openai_bot, timeout=0.3, retries=1)

    started = time.monotonic()
    with pytest.raises(llm.ProviderError, match="no answer within 0.3 s"):
        await collect(bot)
    elapsed = time.monotonic() - started

    # Two attempts of 0.3 s and one backoff of at most 0.25 s.
    assert 0.55 <= elapsed < 1.5
    assert len(fake_openai.requests) == 2


async def test_transient_failures_are_retried(openai_bot: BotProfile, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(2, status=503)

    assert await llm.reply_text(bot=openai_bot, messages=QUESTION) == fake_openai.reply_text
    assert len(fake_openai.requests) == 3


async def test_rate_limit_is_retried(openai_bot: BotProfile, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(1, status=429)

    assert await llm.reply_text(bot=openai_bot, messages=QUESTION) == fake_openai.reply_text
    assert len(fake_openai.requests) == 2


@pytest.mark.parametrize("status", [400, 401])
async def test_client_errors_are_not_retried(openai_bot: BotProfile, fake_openai: FakeOpenAI, status: int) -> None:
    fake_openai.fail_next(1, status=status)

    with pytest.raises(llm.ProviderError, match=f"HTTP {status}"):
        await collect(openai_bot)
    assert len(fake_openai.requests) == 1


async def test_too_many_failures_give_up(openai_bot: BotProfile, fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_next(5, status=500)

    with pytest.raises(llm.ProviderError, match="HTTP 500"):
        await collect(quick(openai_bot, retries=2))
    assert len(fake_openai.requests) == 3


async def test_a_stall_after_the_first_words_fails_without_retrying(
    openai_bot: BotProfile, fake_openai: FakeOpenAI
) -> None:
    fake_openai.stream_delay_seconds = 1.0
    fake_openai.keepalive_seconds = 0.05  # bytes keep coming, but no words
    deltas: list[str] = []

    with pytest.raises(llm.ProviderError, match="no answer within"):
        async for delta in llm.reply_stream(bot=quick(openai_bot, timeout=0.3), messages=QUESTION):
            deltas.append(delta)

    assert deltas == ["The"]  # what was already said stays said; a retry would repeat it
    assert len(fake_openai.requests) == 1


async def test_a_provider_that_cannot_be_reached(openai_bot: BotProfile) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens here once closed
    provider = dataclasses.replace(openai_bot.provider, base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)

    with pytest.raises(llm.ProviderError, match="could not connect"):
        await collect(dataclasses.replace(openai_bot, provider=provider))


# --- circuit breaker ---------------------------------------------------------------------


@pytest.fixture
def breaker_settings(settings) -> None:
    settings.BOT_BREAKER_FAILURES = 2
    settings.BOT_BREAKER_RESET_SECONDS = 0.4


async def test_breaker_opens_then_a_trial_closes_it(
    breaker_settings: None, openai_bot: BotProfile, fake_openai: FakeOpenAI
) -> None:
    bot = quick(openai_bot, retries=0)
    fake_openai.fail_next(2, status=500)
    for _ in range(2):
        with pytest.raises(llm.ProviderError):
            await collect(bot)
    assert llm.breaker_state(bot.provider) == "open"

    with pytest.raises(llm.ProviderUnavailable):
        await collect(bot)
    assert len(fake_openai.requests) == 2  # refused without reaching the provider

    await asyncio.sleep(0.45)
    assert llm.breaker_state(bot.provider) == "half_open"
    assert await llm.reply_text(bot=bot, messages=QUESTION) == fake_openai.reply_text
    assert llm.breaker_state(bot.provider) == "closed"
    assert len(fake_openai.requests) == 3


async def test_a_failed_trial_opens_the_breaker_again(
    breaker_settings: None, openai_bot: BotProfile, fake_openai: FakeOpenAI
) -> None:
    bot = quick(openai_bot, retries=0)
    fake_openai.fail_next(3, status=503)
    for _ in range(2):
        with pytest.raises(llm.ProviderError):
            await collect(bot)
    await asyncio.sleep(0.45)

    with pytest.raises(llm.ProviderError, match="HTTP 503"):
        await collect(bot)

    assert llm.breaker_state(bot.provider) == "open"
    with pytest.raises(llm.ProviderUnavailable):
        await collect(bot)
    assert len(fake_openai.requests) == 3


async def test_breakers_are_per_provider(
    breaker_settings: None, openai_bot: BotProfile, fake_openai: FakeOpenAI
) -> None:
    bot = quick(openai_bot, retries=0)
    fake_openai.fail_next(2, status=500)
    for _ in range(2):
        with pytest.raises(llm.ProviderError):
            await collect(bot)

    other = dataclasses.replace(bot, provider=dataclasses.replace(bot.provider, name=bot.provider.name + "-other"))
    assert llm.breaker_state(other.provider) == "closed"
    assert await llm.reply_text(bot=other, messages=QUESTION) == fake_openai.reply_text


# --- response cache ------------------------------------------------------------------------


async def test_an_identical_question_is_answered_from_the_cache(
    openai_bot: BotProfile, fake_openai: FakeOpenAI
) -> None:
    bot = dataclasses.replace(openai_bot, cache_seconds=60)
    first = await llm.reply_text(bot=bot, messages=QUESTION)
    fake_openai.reply_text = "Something else entirely."

    assert await collect(bot) == [first]
    assert len(fake_openai.requests) == 1


async def test_another_context_is_not_answered_from_the_cache(
    openai_bot: BotProfile, fake_openai: FakeOpenAI
) -> None:
    bot = dataclasses.replace(openai_bot, cache_seconds=60)
    await llm.reply_text(bot=bot, messages=QUESTION)

    await llm.reply_text(bot=bot, messages=ROOM_CONTEXT)

    assert len(fake_openai.requests) == 2


async def test_without_the_cache_every_question_reaches_the_provider(
    openai_bot: BotProfile, fake_openai: FakeOpenAI
) -> None:
    for _ in range(2):
        await llm.reply_text(bot=openai_bot, messages=QUESTION)

    assert len(fake_openai.requests) == 2


async def test_a_broken_cache_does_not_cost_the_reply(
    openai_bot: BotProfile, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    class BrokenCache:
        async def aget(self, key: str) -> None:
            raise ConnectionError("cache is down")

        async def aset(self, key: str, value: str, timeout: int) -> None:
            raise ConnectionError("cache is down")

    monkeypatch.setattr(llm, "cache", BrokenCache())
    bot = dataclasses.replace(openai_bot, cache_seconds=60)

    assert await llm.reply_text(bot=bot, messages=QUESTION) == fake_openai.reply_text


async def test_a_failed_reply_is_not_cached(openai_bot: BotProfile, fake_openai: FakeOpenAI) -> None:
    bot = dataclasses.replace(quick(openai_bot, retries=0), cache_seconds=60)
    fake_openai.fail_next(1, status=500)
    with pytest.raises(llm.ProviderError):
        await collect(bot)

    assert await llm.reply_text(bot=bot, messages=QUESTION) == fake_openai.reply_text
    assert len(fake_openai.requests) == 2


# --- reply length -------------------------------------------------------------------------


async def test_a_long_reply_is_cut_at_a_sentence_end(openai_bot: BotProfile, fake_openai: FakeOpenAI) -> None:
    fake_openai.reply_text = "Paris is lovely. It has a tower. It has a river. It has museums."

    reply = await llm.reply_text(bot=dataclasses.replace(openai_bot, max_reply_chars=20), messages=QUESTION)

    assert reply == "Paris is lovely. It has a tower."


# --- offline responder ----------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the offline responder used the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


async def test_offline_bot_answers_without_network(no_network: None, offline_bot: BotProfile) -> None:
    deltas = await collect(offline_bot)

    assert len(deltas) > 1
    assert "Paris" in "".join(deltas)


@pytest.mark.parametrize(
    ("said", "expected"),
    [
        ("Alice: what is the capital of France?", "The capital of France is Paris."),
        ("Bob: What's your name?", "My name is Robo."),
        ("Alice: what is 2 plus 3?", "2 plus 3 is 5."),
        ("Carol: what is seven times six", "7 times 6 is 42."),
        ("Alice: hello!", "Hello Alice!"),
        ("Bob: thank you", "You're welcome!"),
        ("Bob: bye Robo", "Goodbye Bob!"),
        ("Alice: what time is it?", "It's "),
        ("Alice: what's the date today?", "Today is "),
        ("Carol: what is the meaning of my life?", "You asked about the meaning of your life. I'm an offline demo bot"),
    ],
)
def test_offline_answers(offline_bot: BotProfile, said: str, expected: str) -> None:
    started = time.perf_counter()
    reply = llm.offline_reply(bot=offline_bot, messages=[{"role": "user", "content": said}])

    assert time.perf_counter() - started < 0.005
    assert reply.startswith(expected)
    assert 1 <= reply.count(". ") + reply.count("! ") + 1 <= 3


def test_offline_answers_the_last_person(offline_bot: BotProfile) -> None:
    messages = [
        {"role": "user", "content": "Alice: what is the capital of Japan?"},
        {"role": "assistant", "content": "The capital of Japan is Tokyo."},
        {"role": "user", "content": "Bob: and the capital of Italy?"},
    ]

    assert llm.offline_reply(bot=offline_bot, messages=messages) == "The capital of Italy is Rome."


def test_offline_reply_respects_the_length_limit(offline_bot: BotProfile) -> None:
    bot = dataclasses.replace(offline_bot, max_reply_chars=20)

    reply = llm.offline_reply(bot=bot, messages=[{"role": "user", "content": "Alice: tell me about black holes"}])

    assert reply == "You asked about black holes."


# --- keys stay secret ------------------------------------------------------------------------


async def test_a_rejected_key_is_not_repeated(
    openai_bot: BotProfile, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    fake_openai.api_key = "sk-the-right-one"  # the fake's 401 echoes the key it was given, as OpenAI's does

    with caplog.at_level(logging.DEBUG, logger="bots.llm"), pytest.raises(llm.ProviderError) as raised:
        await collect(openai_bot)

    assert "HTTP 401" in str(raised.value)
    assert FAKE_API_KEY not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert FAKE_API_KEY not in caplog.text
    assert len(fake_openai.requests) == 1
