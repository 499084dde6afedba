"""A person talks with a bot over real WebRTC (aiortc on both sides), through a
real server and a runbots worker on Postgres and Redis, with the language model
behind a fake OpenAI-compatible server on 127.0.0.1."""

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from bots import services
from bots.models import Bot, Provider, Turn
from bots.runner import use_host_addresses
from bots.speech import Synthesizer
from lobbies.models import Lobby
from tests.bots.fake_providers import FakeOpenAI
from tests.bots.conftest import WorkerProcess
from tests.bots.voice_client import VoiceClient
from tests.conftest import LiveServer

# One long sentence, so no pause between sentences passes for the bot falling silent.
pytestmark = pytest.mark.usefixtures("close_thread_connections")

LONG_ANSWER = (
    "The capital of Spain is Madrid, a large and lovely city that has been the capital for a very long time "
    "and is famous for its museums and its food and its parks and the great royal palace by the river."
)


async def until(
    condition: Callable[[], object], timeout: float, what: str, seen: Callable[[], object] = lambda: ""
) -> Any:
    """Poll `condition` (sync, or async for database reads) until it gives something;
    on timeout, say what `seen` shows then."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}; {seen()}"
        await asyncio.sleep(0.05)


def make_bot(fake_openai: FakeOpenAI) -> Bot:
    provider = Provider.objects.create(
        name="fake", kind=Provider.Kind.OPENAI, base_url=fake_openai.base_url, api_key_env="FAKE_OPENAI_KEY", timeout_seconds=5
    )
    return Bot.objects.create(
        name="Ava", provider=provider, model_name="fake-model", greeting="Hello {name}, I am Ava.", system_prompt="Be brief."
    )


async def test_a_person_hears_the_greeting_asks_a_question_hears_the_answer_and_can_interrupt(
    start_production_server: Callable[..., LiveServer],
    start_bot_worker: Callable[..., WorkerProcess],
    fake_openai: FakeOpenAI,
    monkeypatch,
) -> None:
    monkeypatch.setenv("FAKE_OPENAI_KEY", "sk-test-key")
    use_host_addresses(["127.0.0.1"])
    fake_openai.reply_text = LONG_ANSWER
    server = start_production_server()
    await sync_to_async(start_bot_worker)(server)
    bot = await sync_to_async(make_bot)(fake_openai)
    alice = VoiceClient(server, "Alice")
    await alice.join("talk")
    lobby = await Lobby.objects.aget(name="talk")
    added = time.monotonic()
    await sync_to_async(services.bot_add_to_lobby)(bot=bot, lobby=lobby)

    greeting = await until(lambda: alice.loud_since(added), 20, "the greeting", lambda: alice.describe())
    print(f"greeting heard {greeting.at - added:.2f} s after the bot was added")
    await until(lambda: alice.quiet_from(greeting.at), 10, "the greeting to end")
    assert any(chat["text"] == "Hello Alice, I am Ava." for chat in alice.chats)

    question = await Synthesizer().synthesize("What is the capital of Spain?")
    alice.microphone.say(question)
    spoken_end = alice.microphone.speech_ends_at
    answer = await until(lambda: alice.loud_since(spoken_end), 15, "the spoken answer")
    heard_after_ms = 1000 * (answer.at - spoken_end)
    assert heard_after_ms < 2000
    # The model got the transcript, with the speaker's name, after the system prompt.
    body = next(request.body for request in fake_openai.requests if request.path.endswith("/chat/completions"))
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert "spain" in body["messages"][-1]["content"].lower()

    # The person talks over the long answer: the bot falls silent.
    await asyncio.sleep(1.0)
    assert alice.loud_since(time.monotonic() - 0.2), "the answer should still be playing"
    alice.microphone.say(await Synthesizer().synthesize("Wait, stop please."))
    interrupted_at = alice.microphone.speech_starts_at
    silent_at = await until(lambda: alice.quiet_from(interrupted_at), 5, "the bot to stop")
    stopped_ms = 1000 * (silent_at - interrupted_at)

    turn = await until(
        sync_to_async(lambda: Turn.objects.filter(bot=bot, source="voice").order_by("created_at").first()),
        10,
        "the turn in the history",
    )
    print(
        f"end of question to first answer audio heard over WebRTC: {heard_after_ms:.0f} ms; "
        f"the bot's own measure {turn.first_audio_ms:.0f} ms (end of speech {turn.end_of_speech_ms:.0f}, "
        f"recognition {turn.recognition_ms:.0f}, model {turn.model_first_token_ms:.0f}, "
        f"synthesis {turn.synthesis_first_audio_ms:.0f}); barge-in: silent {stopped_ms:.0f} ms after the person "
        f"started talking (heard over WebRTC), the bot's own measure {turn.barge_in_ms:.0f} ms"
    )
    assert "capital" in turn.user_text.lower() and "spain" in turn.user_text.lower()
    assert turn.interrupted and turn.barge_in_ms <= 300
    assert stopped_ms <= 500
    await alice.leave()
