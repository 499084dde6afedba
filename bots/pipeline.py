"""One bot's conversation in one lobby, independent of WebRTC and the database.

People's audio comes in through feed(); each person has a voice activity
detector of their own. An utterance goes to speech recognition (started
speculatively as soon as the speaker falls silent, so it is usually done by
the time the silence counts as the end of speech), then with the recent
conversation to the language model; the reply is spoken piece by piece as it
streams in, and written to the chat once complete. Spoken turns (greetings,
answers, apologies) take their turn one after the other; chat replies run
alongside. Speech from anyone while the bot is answering stops it at once.
"""

import asyncio
import difflib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from cachetools import LRUCache

from bots import llm
from bots.audio import Playback, Speaker
from bots.config import BotProfile, SpeechSettings
from bots.speech import (
    OUTPUT_RATE,
    SpeechEnded,
    SpeechPaused,
    SpeechStarted,
    Synthesizer,
    VoiceActivityDetector,
    speech_for,
)

logger = logging.getLogger(__name__)

Message = dict[str, str]

APOLOGY = "Sorry, I can't answer right now."
INTERNAL_ERROR = "Internal error; see the bot worker's log."
# An utterance is taken for the bot's own voice coming back (through someone's
# microphone) when most of its words, in order, are what the bot said within
# this many seconds before the utterance began. Shorter utterances ("yes",
# "Paris") are never taken for echo: they may well repeat the bot on purpose.
ECHO_SECONDS = 4.0
ECHO_SHARE = 0.7
ECHO_MIN_WORDS = 3
RECENT_PIECES = 32
# The first piece of a reply may end at a comma once it is this long, so
# speech starts before the first sentence is complete.
FIRST_CLAUSE_MIN_CHARS = 20

# Greetings and apologies are said again and again: synthesized once per process.
_spoken_cache: LRUCache[tuple[SpeechSettings, str], np.ndarray] = LRUCache(maxsize=128)


@dataclass
class TurnRecord:
    """What the runner stores as conversation history."""

    source: str  # "voice" | "chat" | "greeting"
    speaker_peer_id: str
    speaker_name: str
    user_text: str
    reply_text: str
    error: str = ""
    interrupted: bool = False  # barge-in cut the reply
    # Milliseconds; None when the stage did not run.
    end_of_speech_ms: float | None = None  # last speech sample → end of speech detected
    # End of speech detected → transcript ready (0 when the speculative recognition was done by then).
    recognition_ms: float | None = None
    model_first_token_ms: float | None = None  # request → first text delta
    synthesis_first_audio_ms: float | None = None  # first text delta → first piece synthesized
    first_audio_ms: float | None = None  # end of user speech → first bot audio frame sent
    barge_in_ms: float | None = None  # person starts talking (as the VAD places it) → bot audio stopped
    # Wall-clock start (time.time()), so the worker can trace the turn with its real duration.
    started_at: float = field(default_factory=time.time, compare=False, repr=False)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
CLAUSE_END = re.compile(r"[,;:]\s+")


class SentenceSplitter:
    """Cuts a streamed reply into pieces to speak as soon as each is complete:
    sentences, and first a clause when it is long enough."""

    def __init__(self) -> None:
        self._buffer = ""
        self._first = True

    def feed(self, delta: str) -> list[str]:
        self._buffer += delta
        pieces = []
        while (end := self._piece_end()) is not None:
            piece, self._buffer = self._buffer[:end].strip(), self._buffer[end:]
            pieces.append(piece)
            self._first = False
        return pieces

    def flush(self) -> list[str]:
        piece, self._buffer = self._buffer.strip(), ""
        return [piece] if piece else []

    def _piece_end(self) -> int | None:
        ends = [match.end() for match in [SENTENCE_END.search(self._buffer)] if match]
        if self._first and (clause := CLAUSE_END.search(self._buffer, FIRST_CLAUSE_MIN_CHARS)):
            ends.append(clause.end())
        return min(ends, default=None)


Recognition = asyncio.Task[tuple[str, float]]  # (transcript, time.monotonic() when it was ready)


@dataclass
class _Listener:
    """One person the bot listens to."""

    name: str
    vad: VoiceActivityDetector = field(default_factory=VoiceActivityDetector)
    # (end_sample, recognition) started when the person fell silent.
    speculation: tuple[int, Recognition] | None = None


@dataclass
class _Utterance:
    peer_id: str
    name: str
    transcript: Recognition
    started_at: float  # time.monotonic() of the first speech sample
    ended_at: float  # ... of the last speech sample
    detected_at: float  # ... when the end was detected


@dataclass
class _Answer:
    """The spoken turn in progress, which barge-in cuts."""

    turn: TurnRecord
    task: asyncio.Task[None]


def _discard(recognition: Recognition) -> None:
    recognition.cancel()
    if recognition.done() and not recognition.cancelled():
        recognition.exception()  # nobody waits for it; its failure is of no interest


class VoicePipeline:
    def __init__(
        self,
        *,
        profile: BotProfile,
        speaker: Speaker,
        send_chat: Callable[[str], Awaitable[None]],
        on_turn: Callable[[TurnRecord], Awaitable[None]],
        on_status: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self.profile = profile
        self.speaker = speaker
        self.send_chat = send_chat
        self.on_turn = on_turn
        self.on_status = on_status
        self.recognizer, self.synthesizer = speech_for(profile.speech)
        self._listeners: dict[str, _Listener] = {}
        # Turns of the conversation, each its messages (a user line, the bot's reply).
        self._context: deque[list[Message]] = deque(maxlen=max(1, profile.context_turns))
        self._spoken_turns: asyncio.Queue[Callable[[], Awaitable[None]]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._answer: _Answer | None = None
        self._status = ("in_room", "")
        self._status_lock = asyncio.Lock()
        # (time.monotonic() when it will have been played, text) of what the bot said lately.
        self._recent_speech: deque[tuple[float, str]] = deque(maxlen=RECENT_PIECES)
        self._speech_until = 0.0

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._take_spoken_turns())

    async def close(self) -> None:
        for listener in self._listeners.values():
            self._drop_speculation(listener)
        tasks = list(self._tasks)
        if self._worker is not None:
            tasks.append(self._worker)
        if self._answer is not None:
            tasks.append(self._answer.task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- what the runner tells the pipeline -------------------------------------

    def feed(self, peer_id: str, name: str, pcm16k: np.ndarray) -> None:
        """Takes the next chunk of a person's audio (int16, 16 kHz mono)."""
        listener = self._listeners.get(peer_id)
        if listener is None:
            listener = self._listeners[peer_id] = _Listener(name)
        listener.name = name
        for event in listener.vad.feed(pcm16k):
            if isinstance(event, SpeechStarted):
                self._speech_started(listener, event)
            elif isinstance(event, SpeechPaused):
                self._speech_paused(listener, event)
            else:
                self._speech_ended(peer_id, listener, event)

    async def greet(self, name: str) -> None:
        """Queues the profile's greeting ({name} replaced) to be said and written; returns at once."""
        if self.profile.greeting:
            self._spoken_turns.put_nowait(partial(self._greeting_turn, name))

    async def on_chat(self, peer_id: str, name: str, text: str, addressed: bool) -> None:
        """Adds a chat line to the conversation; when addressed, a chat reply follows (returns at once)."""
        entry = [{"role": "user", "content": f"{name}: {text}"}]
        self._context.append(entry)
        if addressed:
            self._spawn(self._chat_turn(peer_id, name, text, entry))

    def peer_left(self, peer_id: str) -> None:
        listener = self._listeners.pop(peer_id, None)
        if listener is not None:
            self._drop_speculation(listener)

    # --- listening ----------------------------------------------------------------

    def _speech_started(self, listener: _Listener, event: SpeechStarted) -> None:
        self._drop_speculation(listener)
        if self.speaker.is_speaking or self._answer is not None:
            self._barge_in(time.monotonic() - listener.vad.seconds_since(event.sample))

    def _barge_in(self, speech_started_at: float) -> None:
        self.speaker.stop()
        answer = self._answer
        if answer is not None and not answer.task.done():
            answer.turn.interrupted = True
            answer.turn.barge_in_ms = _ms(time.monotonic() - speech_started_at)
            answer.task.cancel()

    def _speech_paused(self, listener: _Listener, event: SpeechPaused) -> None:
        self._drop_speculation(listener)
        listener.speculation = (event.end_sample, self._recognize(event.audio))

    def _speech_ended(self, peer_id: str, listener: _Listener, event: SpeechEnded) -> None:
        speculation, listener.speculation = listener.speculation, None
        if speculation is not None and speculation[0] == event.end_sample:
            transcript = speculation[1]
        else:
            if speculation is not None:
                _discard(speculation[1])
            transcript = self._recognize(event.audio)
        now = time.monotonic()
        utterance = _Utterance(
            peer_id=peer_id,
            name=listener.name,
            transcript=transcript,
            started_at=now - listener.vad.seconds_since(event.start_sample),
            ended_at=now - listener.vad.seconds_since(event.end_sample),
            detected_at=now,
        )
        self._spoken_turns.put_nowait(partial(self._voice_turn, utterance))

    def _recognize(self, audio: np.ndarray) -> Recognition:
        async def recognize() -> tuple[str, float]:
            text = await self.recognizer.transcribe(audio)
            return text, time.monotonic()

        return asyncio.create_task(recognize())

    def _drop_speculation(self, listener: _Listener) -> None:
        if listener.speculation is not None:
            _discard(listener.speculation[1])
            listener.speculation = None

    def _is_echo(self, text: str, started_at: float) -> bool:
        heard = words(text)
        if len(heard) < ECHO_MIN_WORDS:
            return False
        said = [word for until, piece in self._recent_speech if until >= started_at - ECHO_SECONDS for word in words(piece)]
        matcher = difflib.SequenceMatcher(a=heard, b=said, autojunk=False)
        matched = sum(block.size for block in matcher.get_matching_blocks())
        return matched / len(heard) >= ECHO_SHARE

    # --- spoken turns, one at a time --------------------------------------------------

    async def _take_spoken_turns(self) -> None:
        while True:
            turn = await self._spoken_turns.get()
            try:
                await turn()
            except Exception:
                # The bot must go on listening whatever one turn did.
                logger.exception("Bot %s: a spoken turn failed", self.profile.name)

    async def _voice_turn(self, utterance: _Utterance) -> None:
        turn = TurnRecord(
            source="voice",
            speaker_peer_id=utterance.peer_id,
            speaker_name=utterance.name,
            user_text="",
            reply_text="",
            end_of_speech_ms=_ms(utterance.detected_at - utterance.ended_at),
        )
        try:
            text, recognized_at = await utterance.transcript
            turn.recognition_ms = _ms(max(0.0, recognized_at - utterance.detected_at))
            if not words(text) or self._is_echo(text, utterance.started_at):
                return
            turn.user_text = text
            entry = [{"role": "user", "content": f"{utterance.name}: {text}"}]
            self._context.append(entry)
            if any(listener.vad.in_speech for listener in self._listeners.values()):
                # Someone is talking already: the next utterance's answer will take this one in.
                turn.interrupted = True
            else:
                await self._perform(turn, self._answer_aloud(turn, utterance.ended_at))
                await self._set_status("in_room")
            if turn.reply_text:
                entry.append({"role": "assistant", "content": turn.reply_text})
        except Exception as error:
            await self._fail(turn, error, aloud=True)
        await self.on_turn(turn)

    async def _answer_aloud(self, turn: TurnRecord, ended_at: float) -> None:
        splitter = SentenceSplitter()
        first_token_at = 0.0
        last: Playback | None = None
        async with aclosing(self._reply(turn)) as deltas:
            async for delta in deltas:
                first_token_at = first_token_at or time.monotonic()
                for piece in splitter.feed(delta):
                    last = await self._say(turn, piece, first_token_at, ended_at)
        for piece in splitter.flush():
            last = await self._say(turn, piece, first_token_at, ended_at)
        if turn.reply_text:
            await self.send_chat(turn.reply_text)
        if last is not None:
            await last.finished

    async def _say(self, turn: TurnRecord, piece: str, first_token_at: float, ended_at: float) -> Playback:
        pcm = await self.synthesizer.synthesize(piece)
        playback = self._play(piece, pcm)
        if turn.synthesis_first_audio_ms is None:
            turn.synthesis_first_audio_ms = _ms(time.monotonic() - first_token_at)
            self._when_heard(playback, turn, ended_at)
        return playback

    async def _greeting_turn(self, name: str) -> None:
        text = self.profile.greeting.replace("{name}", name)
        turn = TurnRecord(source="greeting", speaker_peer_id="", speaker_name=name, user_text="", reply_text=text)
        self._context.append([{"role": "assistant", "content": text}])
        try:
            await self._perform(turn, self._greet_aloud(turn, text))
            await self._set_status("in_room")
        except Exception as error:
            await self._fail(turn, error, aloud=True)
        await self.on_turn(turn)

    async def _greet_aloud(self, turn: TurnRecord, text: str) -> None:
        playback = self._play(text, await self._cached_speech(text))
        self._when_heard(playback, turn, None)
        await self.send_chat(text)
        await playback.finished

    async def _perform(self, turn: TurnRecord, speaking: Coroutine[Any, Any, None]) -> None:
        """Runs a spoken answer so that barge-in can cut it; raises what the answer raised."""
        task = asyncio.create_task(speaking)
        self._answer = _Answer(turn, task)
        try:
            await asyncio.wait([task])
        finally:
            self._answer = None
            task.cancel()  # when this turn itself is cancelled (close), so is its answer
        if not task.cancelled():
            task.result()

    def _play(self, text: str, pcm: np.ndarray) -> Playback:
        self._speech_until = max(self._speech_until, time.monotonic()) + len(pcm) / OUTPUT_RATE
        self._recent_speech.append((self._speech_until, text))
        return self.speaker.play(pcm)

    def _when_heard(self, playback: Playback, turn: TurnRecord, ended_at: float | None) -> None:
        """When the answer's first frame goes out: first_audio_ms, and status "speaking"."""

        def heard(started: asyncio.Future[float | None]) -> None:
            if started.cancelled() or started.result() is None:
                return
            if ended_at is not None:
                turn.first_audio_ms = _ms(started.result() - ended_at)
            self._spawn(self._set_status("speaking"))

        playback.started.add_done_callback(heard)

    async def _cached_speech(self, text: str) -> np.ndarray:
        key = (self.profile.speech, text)
        pcm = _spoken_cache.get(key)
        if pcm is None:
            pcm = _spoken_cache[key] = await self.synthesizer.synthesize(text)
        return pcm

    # --- chat ----------------------------------------------------------------------------

    async def _chat_turn(self, peer_id: str, name: str, text: str, entry: list[Message]) -> None:
        turn = TurnRecord(source="chat", speaker_peer_id=peer_id, speaker_name=name, user_text=text, reply_text="")
        try:
            async with aclosing(self._reply(turn)) as deltas:
                async for _ in deltas:
                    pass
            if turn.reply_text:
                entry.append({"role": "assistant", "content": turn.reply_text})
                await self.send_chat(turn.reply_text)
            if self._status[0] == "error":
                await self._set_status("in_room")
        except Exception as error:
            await self._fail(turn, error, aloud=False)
        await self.on_turn(turn)

    # --- the model, failures, status -------------------------------------------------------

    async def _reply(self, turn: TurnRecord) -> AsyncIterator[str]:
        """The model's reply to the conversation so far, delta by delta, kept in turn.reply_text."""
        asked_at = time.monotonic()
        messages = [message for entry in self._context for message in entry]
        async with aclosing(llm.reply_stream(bot=self.profile, messages=messages)) as deltas:
            async for delta in deltas:
                if turn.model_first_token_ms is None:
                    turn.model_first_token_ms = _ms(time.monotonic() - asked_at)
                turn.reply_text += delta
                yield delta
        turn.reply_text = turn.reply_text.strip()

    async def _fail(self, turn: TurnRecord, error: Exception, *, aloud: bool) -> None:
        """Says (or only writes) a short apology, and shows the error as the bot's status."""
        if isinstance(error, llm.ProviderError):
            turn.error = str(error)
            logger.warning("Bot %s could not answer: %s", self.profile.name, error)
        else:
            turn.error = INTERNAL_ERROR
            logger.error("Bot %s failed to answer", self.profile.name, exc_info=error)
        await self.send_chat(APOLOGY)
        if aloud:
            try:
                pcm = await self._cached_speech(APOLOGY)
            except Exception:
                # The bot's own voice may be what failed: apologize in eSpeak's default one.
                pcm = await Synthesizer().synthesize(APOLOGY)
            self._play(APOLOGY, pcm)
        await self._set_status("error", turn.error)

    async def _set_status(self, status: str, error: str = "") -> None:
        # One at a time, so the runner sees them in the order they happened.
        async with self._status_lock:
            if (status, error) != self._status:
                self._status = (status, error)
                await self.on_status(status, error)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
