"""Benchmark of the bots' voice pipeline: end of user speech → first bot audio.

Spoken questions (synthesized by eSpeak NG) go into VoicePipeline.feed in real
time, 20 ms at a time with silence between them, exactly as the runner feeds
a person's audio. The end of each question is known exactly from the audio
fed; the first bot audio is the first non-silent frame read from a speaker
track, as a peer connection reads it. Once it is heard the benchmark cuts the
reply short (playing it out would cost time, not CPU) and asks the next
question. Then 2, 3, ... bots converse at once, each in a lobby of its own,
until the median doubles.
"""

import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from bots import speech
from bots.audio import Speaker, SpeakerTrack
from bots.config import OFFLINE, OPENAI, BotProfile, ProviderSettings
from bots.pipeline import TurnRecord, VoicePipeline

QUESTIONS = [
    "What is the capital of France?",
    "What is seven plus five?",
    "What time is it?",
    "What is your name?",
    "What is the capital of Japan?",
    "How are you today?",
    "What is twelve times three?",
    "What is the capital of Italy?",
    "What day is it today?",
    "Tell me about the weather in London.",
    "What is the capital of Canada?",
    "What is ten minus four?",
    "Who are you, and what can you do?",
    "What is the capital of Germany?",
    "Can you tell me about the moon?",
    "What is the capital of Spain?",
    "What is nine times nine?",
    "Thank you very much.",
    "What is the capital of Egypt?",
    "Hello, is anybody there?",
    "What is the capital of Norway?",
    "What is twenty divided by four?",
    "What is the capital of Brazil?",
    "Tell me something about computers.",
]
CHUNK = 320  # 20 ms at 16 kHz, as pump() delivers
CHUNK_SECONDS = CHUNK / speech.INPUT_RATE
LEAD_SILENCE_SECONDS = 0.3
PAUSE_BETWEEN_TURNS_SECONDS = (0.3, 0.8)
TURN_TIMEOUT_SECONDS = 10.0
# Stages as TurnRecord has them; what they do not cover is the last row.
STAGES = [
    ("end_of_speech_ms", "end-of-speech detection", "eos"),
    ("recognition_ms", "recognition (wait after the end)", "asr"),
    ("model_first_token_ms", "model first token", "llm"),
    ("synthesis_first_audio_ms", "first synthesized audio", "tts"),
]
REST = "rest: VAD end lag, 20 ms frame clock, hand-offs"


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@dataclass
class Turn:
    bot: int
    question: str
    first_audio_ms: float | None  # None: no answer within TURN_TIMEOUT_SECONDS
    record: TurnRecord | None


class Mouth:
    """Feeds one person's audio to a pipeline in real time: silence, or the question queued."""

    def __init__(self, pipeline: VoicePipeline) -> None:
        self.pipeline = pipeline
        self.queued = np.zeros(0, dtype=np.int16)
        self.question_end: asyncio.Future[float] | None = None

    def say(self, audio: np.ndarray) -> asyncio.Future[float]:
        """Queues a question; the future gets the time.monotonic() its last sample was fed."""
        # Leading silence pads it to whole chunks, so the speech ends exactly at a chunk's end.
        padding = np.zeros((-len(audio)) % CHUNK, dtype=np.int16)
        self.queued = np.concatenate([padding, audio])
        self.question_end = asyncio.get_running_loop().create_future()
        return self.question_end

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        silence = np.zeros(CHUNK, dtype=np.int16)
        tick = loop.time()
        while True:
            tick += CHUNK_SECONDS
            await asyncio.sleep(max(0.0, tick - loop.time()))
            chunk, self.queued = (self.queued[:CHUNK], self.queued[CHUNK:]) if len(self.queued) else (silence, self.queued)
            self.pipeline.feed("person", "Alice", chunk)
            if self.question_end is not None and not len(self.queued) and chunk is not silence:
                self.question_end.set_result(time.monotonic())
                self.question_end = None


async def first_audio(track: SpeakerTrack, after: float) -> float:
    """time.monotonic() of the first non-silent frame read after `after`."""
    while True:
        frame = await track.recv()
        if time.monotonic() > after and np.any(frame.to_ndarray()):
            return time.monotonic()


async def converse(
    bot: int, profile: BotProfile, questions: list[tuple[str, np.ndarray]], report: Callable[[Turn], None]
) -> list[Turn]:
    """One bot in a lobby of its own, asked `questions` one after the other."""
    speaker = Speaker()
    await speaker.start()
    track = speaker.track()
    records: asyncio.Queue[TurnRecord] = asyncio.Queue()

    async def on_turn(record: TurnRecord) -> None:
        records.put_nowait(record)

    async def ignore(*args: Any) -> None:
        pass

    pipeline = VoicePipeline(profile=profile, speaker=speaker, send_chat=ignore, on_turn=on_turn, on_status=ignore)
    await pipeline.start()
    mouth = Mouth(pipeline)
    feeding = asyncio.create_task(mouth.run())
    turns = []
    try:
        for text, audio in questions:
            await asyncio.sleep(random.uniform(*PAUSE_BETWEEN_TURNS_SECONDS))
            ended_at = await mouth.say(audio)
            try:
                heard_at = await asyncio.wait_for(first_audio(track, ended_at), TURN_TIMEOUT_SECONDS)
                speaker.stop()
                record = await asyncio.wait_for(records.get(), TURN_TIMEOUT_SECONDS)
                turn = Turn(bot, text, round((heard_at - ended_at) * 1000, 1), record)
            except TimeoutError:
                turn = Turn(bot, text, None, None)
            turns.append(turn)
            report(turn)
    finally:
        feeding.cancel()
        await pipeline.close()
        await speaker.close()
    return turns


class Command(BaseCommand):
    help = "Measure end of user speech → first bot audio for the offline voice pipeline, alone and with bots in parallel."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--turns", type=int, default=20, help="questions for the single bot")
        parser.add_argument("--max-bots", type=int, default=24, help="most bots to run in parallel")
        parser.add_argument("--parallel-turns", type=int, default=6, help="questions per bot with bots in parallel")
        parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
        parser.add_argument("--provider-url", help="an OpenAI-compatible endpoint for the replies instead of the offline responder")
        parser.add_argument("--model", default="", help="model name for --provider-url")
        parser.add_argument("--seed", type=int, default=1)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["turns"] < 1 or options["max_bots"] < 1 or options["parallel_turns"] < 1:
            raise CommandError("--turns, --max-bots and --parallel-turns must be at least 1")
        random.seed(options["seed"])
        profile = self.profile(options)
        self.stdout.write(
            f"Voice pipeline benchmark on {os.cpu_count()} CPU cores: faster-whisper "
            f"({settings.BOT_WHISPER_MODEL_DIR or 'Whisper tiny.en'}, {settings.BOT_ASR_THREADS} threads), "
            f"eSpeak NG, {'offline responder' if profile.provider.kind == OFFLINE else profile.provider.base_url}; "
            f"end of speech after {settings.BOT_END_OF_SPEECH_MS} ms of silence"
        )
        started = time.perf_counter()
        speech.warm_up()
        spoken = {text: speech.espeak_pcm(text, rate=speech.INPUT_RATE) for text in QUESTIONS}
        self.stdout.write(f"Models loaded and {len(QUESTIONS)} questions synthesized in {time.perf_counter() - started:.1f} s")

        self.stdout.write(f"\nOne bot, {options['turns']} turns:")
        single = asyncio.run(self.run_bots(profile, spoken, bots=1, turns=options["turns"]))
        answered = [turn for turn in single if turn.first_audio_ms is not None]
        if not answered:
            raise CommandError("The bot answered none of the questions.")
        results: dict[str, Any] = {"single": self.summary(single), "parallel": []}
        self.print_single(single, results["single"])

        base = results["single"]["p50_ms"]
        rows = [{"bots": 1, **results["single"]}]
        for bots in range(2, options["max_bots"] + 1):
            self.stdout.write(f"\n{bots} bots in parallel, {options['parallel_turns']} turn(s) each:")
            turns = asyncio.run(self.run_bots(profile, spoken, bots=bots, turns=options["parallel_turns"]))
            rows.append({"bots": bots, **self.summary(turns)})
            if rows[-1]["p50_ms"] is None or rows[-1]["p50_ms"] >= 2 * base:
                break
        results["parallel"] = rows
        within = [row["bots"] for row in rows if row["p50_ms"] is not None and row["p50_ms"] < 2 * base]
        results["bots_before_p50_doubles"] = max(within)
        results["p50_doubled"] = len(within) < len(rows)
        self.print_table(rows, results, base)
        if options["json"]:
            with open(options["json"], "w") as out:
                json.dump(results, out, indent=2)

    def profile(self, options: dict[str, Any]) -> BotProfile:
        if options["provider_url"]:
            provider = ProviderSettings(
                name="benchmark", kind=OPENAI, base_url=options["provider_url"],
                api_key=os.environ.get("OPENAI_API_KEY", ""), timeout_seconds=10.0, max_retries=0,
            )
            return BotProfile(bot_id=0, name="Robo", provider=provider, model_name=options["model"])
        return BotProfile(bot_id=0, name="Robo", provider=ProviderSettings(name="offline", kind=OFFLINE))

    async def run_bots(self, profile: BotProfile, spoken: dict[str, np.ndarray], *, bots: int, turns: int) -> list[Turn]:
        def report(turn: Turn) -> None:
            self.stdout.write(self.turn_line(turn, bots))

        conversations = []
        for bot in range(1, bots + 1):
            order = random.sample(QUESTIONS, len(QUESTIONS))
            questions = [(text, spoken[text]) for text in (order * (turns // len(order) + 1))[:turns]]
            conversations.append(converse(bot, profile, questions, report))
        return [turn for turns_of_bot in await asyncio.gather(*conversations) for turn in turns_of_bot]

    def turn_line(self, turn: Turn, bots: int) -> str:
        who = f"bot {turn.bot}: " if bots > 1 else ""
        if turn.first_audio_ms is None or turn.record is None:
            return f"  {who}{turn.question!r:42} no answer within {TURN_TIMEOUT_SECONDS:g} s"
        stages = " ".join(f"{short} {getattr(turn.record, key) or 0:.0f}" for key, _, short in STAGES)
        return f"  {who}{turn.question!r:42} first audio {turn.first_audio_ms:6.0f} ms  ({stages}; heard {turn.record.user_text!r})"

    def summary(self, turns: list[Turn]) -> dict[str, Any]:
        times = [turn.first_audio_ms for turn in turns if turn.first_audio_ms is not None]
        answered = [turn for turn in turns if turn.record is not None]
        stages = {key: statistics.fmean(getattr(turn.record, key) or 0.0 for turn in answered) if answered else None for key, _, _ in STAGES}
        return {
            "turns": len(turns),
            "unanswered": len(turns) - len(times),
            "p50_ms": percentile(times, 0.5) if times else None,
            "p95_ms": percentile(times, 0.95) if times else None,
            "mean_ms": statistics.fmean(times) if times else None,
            "stage_means_ms": stages,
            "first_audio_ms": times,
            "turn_details": [asdict(turn) for turn in turns],
        }

    def print_single(self, turns: list[Turn], summary: dict[str, Any]) -> None:
        self.stdout.write(
            f"\nEnd of user speech → first bot audio, {len(turns) - summary['unanswered']} of {len(turns)} turns answered: "
            f"p50 {summary['p50_ms']:.0f} ms, p95 {summary['p95_ms']:.0f} ms"
        )
        self.stdout.write("Where the time goes (mean per turn):")
        total = summary["mean_ms"]
        covered = 0.0
        for key, label, _ in STAGES:
            value = summary["stage_means_ms"][key]
            covered += value
            self.stdout.write(f"  {label:48} {value:6.0f} ms  {100 * value / total:3.0f}%")
        self.stdout.write(f"  {REST:48} {total - covered:6.0f} ms  {100 * (total - covered) / total:3.0f}%")

    def print_table(self, rows: list[dict[str, Any]], results: dict[str, Any], base: float) -> None:
        self.stdout.write("\nbots   turns   p50 ms   p95 ms   unanswered")
        for row in rows:
            p50 = f"{row['p50_ms']:8.0f}" if row["p50_ms"] is not None else "       -"
            p95 = f"{row['p95_ms']:8.0f}" if row["p95_ms"] is not None else "       -"
            self.stdout.write(f"{row['bots']:4}   {row['turns']:5}   {p50} {p95}   {row['unanswered']:10}")
        verdict = "" if results["p50_doubled"] else f" (p50 had not doubled at {rows[-1]['bots']}, the most tried)"
        self.stdout.write(
            f"Bots this machine runs in parallel before p50 doubles (≥ {2 * base:.0f} ms): "
            f"{results['bots_before_p50_doubles']}{verdict}"
        )
