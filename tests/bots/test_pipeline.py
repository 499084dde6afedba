"""The voice pipeline with a real Speaker, real speech models and the offline
responder (or a fake provider), fed spoken audio in real time as the runner feeds it.

Also the Speaker's frames and pump()'s resampling, which the pipeline's
timings rest on.
"""

import asyncio
import dataclasses
import fractions
import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from bots import speech
from bots.audio import FRAME_SAMPLES, Speaker, SpeakerTrack, pump
from bots.config import OPENAI, BotProfile, ProviderSettings
from bots.pipeline import APOLOGY, SentenceSplitter, TurnRecord, VoicePipeline, words
from tests.bots.fake_providers import FakeOpenAI, RequestHandler

RATE = speech.INPUT_RATE
CHUNK = 320  # 20 ms


@pytest.fixture(scope="module", autouse=True)
def models_loaded() -> None:
    speech.warm_up()


@functools.cache
def spoken(text: str) -> np.ndarray:
    return speech.espeak_pcm(text, rate=RATE)


class Output:
    """Reads a speaker track as a peer connection does, noting when each frame came and whether it was silent."""

    def __init__(self, track: SpeakerTrack) -> None:
        self.frames: list[tuple[float, bool]] = []  # (time.monotonic(), audible)
        self._task = asyncio.create_task(self._read(track))

    async def _read(self, track: SpeakerTrack) -> None:
        while True:
            frame = await track.recv()
            self.frames.append((time.monotonic(), bool(frame.to_ndarray().any())))

    def first_audible_after(self, moment: float) -> float | None:
        return next((at for at, audible in self.frames if at > moment and audible), None)

    def fell_silent(self, moment: float, seconds: float = 0.25) -> float | None:
        """When the output first fell silent after `moment` for at least `seconds` (longer
        than the pauses between sentences), or None."""
        silent_since = None
        for at, audible in self.frames:
            if at <= moment:
                continue
            if audible:
                silent_since = None
            elif silent_since is None:
                silent_since = at
            elif at - silent_since >= seconds:
                return silent_since
        return None

    def audible_between(self, start: float, end: float) -> bool:
        return any(audible for at, audible in self.frames if start < at <= end)

    def close(self) -> None:
        self._task.cancel()


class Room:
    """A pipeline in a lobby of its own: what it says, writes and reports."""

    def __init__(self, profile: BotProfile) -> None:
        self.profile = profile
        self.chat: list[str] = []
        self.statuses: list[tuple[str, str]] = []
        self.turns: asyncio.Queue[TurnRecord] = asyncio.Queue()
        self.speech_started_at = 0.0

    async def __aenter__(self) -> "Room":
        self.speaker = Speaker()
        await self.speaker.start()
        self.output = Output(self.speaker.track())
        self.pipeline = VoicePipeline(
            profile=self.profile,
            speaker=self.speaker,
            send_chat=self.send_chat,
            on_turn=self.on_turn,
            on_status=self.on_status,
        )
        await self.pipeline.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.pipeline.close()
        self.output.close()
        await self.speaker.close()

    async def send_chat(self, text: str) -> None:
        self.chat.append(text)

    async def on_turn(self, turn: TurnRecord) -> None:
        self.turns.put_nowait(turn)

    async def on_status(self, status: str, error: str) -> None:
        self.statuses.append((status, error))

    async def say(self, text: str, *, peer_id: str = "alice", name: str = "Alice", then_silence: float = 0.6) -> float:
        """Feeds `text`, spoken, in real time, then silence; returns time.monotonic() when the speech ended."""
        return await self.feed(spoken(text), peer_id=peer_id, name=name, then_silence=then_silence)

    async def feed(self, audio: np.ndarray, *, peer_id: str = "alice", name: str = "Alice", then_silence: float = 0.6) -> float:
        """Also notes in speech_started_at when the first chunk went in."""
        # Padded in front to whole chunks, so the speech ends exactly where a chunk does.
        audio = np.concatenate([np.zeros((-len(audio)) % CHUNK, dtype=np.int16), audio])
        chunks = [audio[start : start + CHUNK] for start in range(0, len(audio), CHUNK)]
        silence = np.zeros(CHUNK, dtype=np.int16)
        loop = asyncio.get_running_loop()
        tick = loop.time()
        ended_at = 0.0
        for index, chunk in enumerate(chunks + [silence] * round(then_silence / 0.02)):
            tick += 0.02
            await asyncio.sleep(max(0.0, tick - loop.time()))
            self.pipeline.feed(peer_id, name, chunk)
            if index == 0:
                # The chunk holds the 20 ms just gone: the speech began at most that long ago.
                self.speech_started_at = time.monotonic() - 0.02
            if index == len(chunks) - 1:
                ended_at = time.monotonic()
        return ended_at

    async def next_turn(self, timeout: float = 10.0) -> TurnRecord:
        return await asyncio.wait_for(self.turns.get(), timeout)


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


# --- the Speaker and pump ---------------------------------------------------------------


async def test_speaker_sends_20ms_frames_of_what_it_plays_then_silence() -> None:
    speaker = Speaker()
    await speaker.start()
    track = speaker.track()
    ramp = np.arange(1, 3 * FRAME_SAMPLES + 100, dtype=np.int16)  # no zero in it: where it starts shows
    try:
        playback = speaker.play(ramp)
        assert speaker.is_speaking
        started = time.monotonic()
        frames = [await track.recv() for _ in range(8)]
        elapsed = time.monotonic() - started
    finally:
        await speaker.close()

    assert all(frame.samples == FRAME_SAMPLES and frame.sample_rate == 48000 for frame in frames)
    assert all(frame.format.name == "s16" and frame.layout.name == "mono" for frame in frames)
    assert [frame.pts for frame in frames] == [n * FRAME_SAMPLES for n in range(8)]
    assert frames[0].time_base == fractions.Fraction(1, 48000)
    sent = np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames])
    # Silence until play(), then the ramp whole and in order, then silence.
    first = np.flatnonzero(sent)[0]
    assert first % FRAME_SAMPLES == 0
    assert np.array_equal(sent[first : first + len(ramp)], ramp)
    assert not sent[first + len(ramp) :].any()
    assert playback.started.result() is not None and playback.finished.result() is True
    assert not speaker.is_speaking
    assert elapsed >= 0.1  # paced by the 20 ms clock, not as fast as it can


async def test_speaker_stop_drops_what_is_queued() -> None:
    speaker = Speaker()
    await speaker.start()
    track = speaker.track()
    try:
        loud = np.full(48000, 5000, dtype=np.int16)
        first, second = speaker.play(loud), speaker.play(loud)
        while not (await track.recv()).to_ndarray().any():
            pass
        speaker.stop()
        after = [bool((await track.recv()).to_ndarray().any()) for _ in range(3)]
    finally:
        await speaker.close()

    assert after == [False, False, False]
    assert first.finished.result() is False and second.started.result() is None
    assert not speaker.is_speaking


async def test_removed_track_ends() -> None:
    speaker = Speaker()
    await speaker.start()
    track = speaker.track()
    speaker.remove_track(track)
    with pytest.raises(MediaStreamError):
        await asyncio.wait_for(track.recv(), 1)
    await speaker.close()


class StereoTone(MediaStreamTrack):
    """A remote track as aiortc's Opus decoder gives it: 48 kHz s16 stereo, 20 ms frames."""

    kind = "audio"

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames
        self.sent = 0

    async def recv(self) -> av.AudioFrame:
        if self.sent == self.frames:
            raise MediaStreamError
        index, self.sent = self.sent, self.sent + 1
        t = (np.arange(960) + index * 960) / 48000
        tone = (np.sin(2 * np.pi * 1000 * t) * 8000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(np.repeat(tone, 2).reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = 48000
        frame.pts = index * 960
        frame.time_base = fractions.Fraction(1, 48000)
        return frame


async def test_pump_gives_16k_mono_until_the_track_ends() -> None:
    chunks: list[np.ndarray] = []

    await asyncio.wait_for(pump(StereoTone(50), chunks.append), 5)

    audio = np.concatenate(chunks)
    assert all(chunk.dtype == np.int16 and chunk.ndim == 1 for chunk in chunks)
    assert abs(len(audio) - RATE) <= 64  # one second, less the resampler's delay
    spectrum = np.abs(np.fft.rfft(audio[1000:9000].astype(np.float64)))
    assert np.argmax(spectrum) * RATE / 8000 == pytest.approx(1000, abs=5)


# --- splitting replies -------------------------------------------------------------------------


def test_replies_are_spoken_sentence_by_sentence_with_an_early_first_clause() -> None:
    splitter = SentenceSplitter()
    reply = "Well, it depends on the season, really. In summer it is 3.5 degrees warmer! Bye"
    pieces = [piece for token in reply.split(" ") for piece in splitter.feed(token + " ")] + splitter.flush()

    assert pieces == ["Well, it depends on the season,", "really.", "In summer it is 3.5 degrees warmer!", "Bye"]


# --- conversations ---------------------------------------------------------------------------------


async def test_a_spoken_question_gets_a_spoken_answer(offline_bot: BotProfile) -> None:
    async with Room(offline_bot) as room:
        ended_at = await room.say("What is the capital of France?")
        turn = await room.next_turn()

    assert turn.source == "voice" and turn.speaker_peer_id == "alice" and turn.speaker_name == "Alice"
    assert {"capital", "france"} <= set(words(turn.user_text))
    assert turn.reply_text == "The capital of France is Paris."
    assert not turn.error and not turn.interrupted
    # The first audible frame on the track came first_audio_ms after the speech ended (give or take the
    # VAD's idea of where the speech ended), and quickly.
    heard_at = room.output.first_audible_after(ended_at)
    assert heard_at is not None
    assert turn.first_audio_ms is not None
    assert abs((heard_at - ended_at) * 1000 - turn.first_audio_ms) < 80
    assert (heard_at - ended_at) * 1000 < 1000
    for stage in (turn.end_of_speech_ms, turn.recognition_ms, turn.model_first_token_ms, turn.synthesis_first_audio_ms):
        assert stage is not None and stage >= 0
    # The whole reply was played, written to the chat, and shown as speaking.
    audible = [at for at, loud in room.output.frames if loud]
    spoken_seconds = len(speech.espeak_pcm(turn.reply_text)) / speech.OUTPUT_RATE
    assert audible[-1] + 0.02 - heard_at == pytest.approx(spoken_seconds, abs=0.1)
    assert room.chat == ["The capital of France is Paris."]
    assert room.statuses == [("speaking", ""), ("in_room", "")]


async def test_speaking_over_the_bot_stops_it_within_300_ms(offline_bot: BotProfile) -> None:
    async with Room(offline_bot) as room:
        # A long answer; the person stays silent while it starts.
        ended_at = await room.say("Tell me about the history of the Roman empire.", then_silence=1.2)
        heard_at = room.output.first_audible_after(ended_at)
        assert heard_at is not None and room.speaker.is_speaking
        cut_in = asyncio.create_task(room.say("Sorry but I have another question for you", then_silence=0.0))
        turn = await room.next_turn()
        await cut_in

    assert turn.user_text and turn.reply_text.startswith("You asked about")
    assert turn.interrupted
    assert turn.barge_in_ms is not None and turn.barge_in_ms < 300
    cut_in_at = room.speech_started_at
    # The bot was speaking when the person cut in, and fell silent soon after.
    assert room.output.audible_between(cut_in_at - 0.1, cut_in_at)
    stopped_at = room.output.fell_silent(cut_in_at)
    assert stopped_at is not None and (stopped_at - cut_in_at) * 1000 < 300


async def test_the_bot_does_not_answer_its_own_voice(offline_bot: BotProfile) -> None:
    async with Room(offline_bot) as room:
        await room.say("What is the capital of Japan?")
        answer = await room.next_turn()
        assert answer.reply_text == "The capital of Japan is Tokyo."
        # Its own words come back (say, through someone's loudspeaker and microphone).
        echo_at = time.monotonic()
        await room.feed(spoken(answer.reply_text), then_silence=0.8)
        assert room.turns.empty()
        assert not room.output.audible_between(echo_at, time.monotonic())
        # Still listening: a question of the person's own gets its answer.
        ended_at = await room.say("What is the capital of Germany?")
        await eventually(lambda: room.output.first_audible_after(ended_at) is not None and len(room.chat) == 2)

    assert room.chat == ["The capital of Japan is Tokyo.", "The capital of Germany is Berlin."]


async def test_chat_addressed_gets_a_chat_reply_and_the_rest_is_context(openai_bot: BotProfile, fake_openai: FakeOpenAI) -> None:
    fake_openai.reply_text = "Hello Bob, nice to meet you."
    async with Room(openai_bot) as room:
        await room.pipeline.on_chat("alice", "Alice", "hello everyone", addressed=False)
        await asyncio.sleep(0.3)
        assert room.chat == [] and room.turns.empty()

        await room.pipeline.on_chat("bob", "Bob", "Robo, say hello", addressed=True)
        turn = await room.next_turn()

    assert turn == TurnRecord(
        source="chat", speaker_peer_id="bob", speaker_name="Bob", user_text="Robo, say hello",
        reply_text="Hello Bob, nice to meet you.", model_first_token_ms=turn.model_first_token_ms,
    )
    assert room.chat == ["Hello Bob, nice to meet you."]
    [request] = [request for request in fake_openai.requests if request.path == "/v1/chat/completions"]
    assert request.body["messages"][-1] == {"role": "user", "content": "Alice: hello everyone\nBob: Robo, say hello"}
    # Text only: nothing was said.
    assert not any(audible for _, audible in room.output.frames)


async def test_the_greeting_is_said_and_written(offline_bot: BotProfile) -> None:
    bot = dataclasses.replace(offline_bot, greeting="Hello {name}, I am Robo.")
    async with Room(bot) as room:
        await room.pipeline.greet("Alice")
        turn = await room.next_turn()

    assert (turn.source, turn.speaker_name, turn.reply_text) == ("greeting", "Alice", "Hello Alice, I am Robo.")
    assert room.chat == ["Hello Alice, I am Robo."]
    assert any(audible for _, audible in room.output.frames)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def provider_comes_back(fake_openai: FakeOpenAI) -> Iterator[tuple[int, threading.Event]]:
    """A port nothing listens on, until the returned event is set: then fake_openai answers there."""
    port = free_port()
    back = threading.Event()
    handler = type("Handler", (RequestHandler,), {"fake": fake_openai})
    servers: list[ThreadingHTTPServer] = []

    def serve() -> None:
        back.wait()
        servers.append(server := ThreadingHTTPServer(("127.0.0.1", port), handler))
        server.serve_forever(poll_interval=0.02)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port, back
    back.set()
    while not servers:
        time.sleep(0.01)
    servers[0].shutdown()
    servers[0].server_close()


async def test_provider_failure_is_apologized_for_then_recovered(
    offline_bot: BotProfile, provider_comes_back: tuple[int, threading.Event]
) -> None:
    port, back = provider_comes_back
    provider = ProviderSettings(
        name="flaky", kind=OPENAI, base_url=f"http://127.0.0.1:{port}/v1", timeout_seconds=0.5, max_retries=0
    )
    bot = dataclasses.replace(offline_bot, provider=provider, model_name="gpt-test")
    async with Room(bot) as room:
        ended_at = await room.say("What is the capital of France?")
        failed = await room.next_turn()
        apology_heard = room.output.first_audible_after(ended_at)
        back.set()
        await asyncio.sleep(0.2)
        await room.say("What is the capital of France?")
        recovered = await room.next_turn()

    assert failed.error.startswith("flaky: ") and "connect" in failed.error
    assert {"capital", "france"} <= set(words(failed.user_text)) and failed.reply_text == ""
    assert apology_heard is not None
    assert room.statuses[0] == ("error", failed.error)
    assert recovered.error == "" and recovered.reply_text == "The capital of France is Paris."
    assert room.chat == [APOLOGY, "The capital of France is Paris."]
    assert room.statuses[-2:] == [("speaking", ""), ("in_room", "")]
