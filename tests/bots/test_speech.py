"""Speech for the bots: eSpeak NG synthesis, faster-whisper recognition, Silero VAD,
and the OpenAI-compatible endpoints (against the fake provider)."""

import functools
import io
import socket
import wave

import numpy as np
import pytest
from django.conf import settings

from bots import speech
from bots.config import ANTHROPIC, OPENAI, ProviderSettings, SpeechSettings
from bots.llm import ProviderError
from bots.pipeline import words
from tests.bots.conftest import FAKE_API_KEY
from tests.bots.fake_providers import SPEECH_SECONDS_PER_WORD, FakeOpenAI

RATE = speech.INPUT_RATE
CHUNK = 320  # 20 ms, as pump() delivers


@pytest.fixture(scope="module", autouse=True)
def models_loaded() -> None:
    speech.warm_up()


@functools.cache
def spoken(text: str) -> np.ndarray:
    """`text` said by eSpeak NG, at 16 kHz: a person's question."""
    return speech.espeak_pcm(text, rate=RATE)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


def run_vad(audio: np.ndarray) -> list[tuple[int, speech.VadEvent]]:
    """Feeds `audio` in 20 ms chunks; each event with the samples fed when it came."""
    vad = speech.VoiceActivityDetector()
    events = []
    for start in range(0, len(audio), CHUNK):
        for event in vad.feed(audio[start : start + CHUNK]):
            events.append((vad.samples_fed, event))
    return events


# --- synthesis -----------------------------------------------------------------------


async def test_synthesis_is_audible_48k_speech() -> None:
    text = "Hello there, how are you doing today?"
    pcm = await speech.Synthesizer().synthesize(text)

    assert pcm.dtype == np.int16 and pcm.ndim == 1
    # 48 kHz: three times the samples of the same speech at 16 kHz, plus the pause after it.
    pause = int(speech.PIECE_PAUSE_SECONDS * speech.OUTPUT_RATE)
    assert len(pcm) - pause == pytest.approx(3 * len(spoken(text)), rel=0.01)
    assert 1.0 < (len(pcm) - pause) / speech.OUTPUT_RATE < 4.0
    # Loud throughout the speech, starting with the very first frame (leading silence trimmed).
    assert np.sqrt(np.mean(pcm[:-pause].astype(np.float64) ** 2)) > 1000
    assert np.abs(pcm[:960]).max() > speech.LEADING_SILENCE_LEVEL
    assert not pcm[-pause:].any()


async def test_synthesis_of_an_unknown_voice_fails_clearly() -> None:
    with pytest.raises(ValueError, match="no voice"):
        await speech.Synthesizer("xx-no-such-voice").synthesize("Hello.")


# --- recognition ---------------------------------------------------------------------


async def test_recognizer_hears_a_spoken_question() -> None:
    audio = np.concatenate([silence(0.2), spoken("What is the capital of France?"), silence(0.2)])

    text = await speech.Recognizer().transcribe(audio)

    assert {"what", "capital", "france"} <= set(words(text))


async def test_recognizer_hears_a_long_utterance() -> None:
    # Over 9 s: past the short window, through faster-whisper's own 30 s windows.
    sentences = [
        "The weather in London is rainy and cold today.",
        "Please tell me the capital of Germany and the capital of Spain.",
        "After that I would like to hear a short story about a friendly robot.",
        "Thank you very much for your help this morning.",
    ]
    audio = np.concatenate([part for sentence in sentences for part in (spoken(sentence), silence(0.3))])
    assert len(audio) > speech.SHORT_UTTERANCE_SAMPLES

    heard = set(words(await speech.Recognizer().transcribe(audio)))

    assert {"london", "germany", "spain", "robot", "morning"} <= heard


async def test_recognizer_hears_nothing_in_silence() -> None:
    assert await speech.Recognizer().transcribe(silence(1.0)) == ""


# --- voice activity detection -----------------------------------------------------------


def test_vad_finds_the_start_and_end_of_speech() -> None:
    question = spoken("What is the capital of France?")
    speech_start = int(0.5 * RATE)
    speech_end = speech_start + len(question)
    events = run_vad(np.concatenate([silence(0.5), question, silence(1.0)]))

    kinds = [type(event).__name__ for _, event in events]
    assert kinds == ["SpeechStarted", "SpeechPaused", "SpeechEnded"]
    (started_fed, started), (_, paused), (ended_fed, ended) = events
    # Speech start is known within a window of the truth, and quickly: barge-in waits for it.
    assert abs(started.sample - speech_start) <= speech.VAD_WINDOW
    assert started_fed - speech_start <= 0.2 * RATE
    # The end is found after BOT_END_OF_SPEECH_MS of silence, within a window or two.
    assert abs(ended.end_sample - speech_end) <= 2 * speech.VAD_WINDOW
    end_wait_ms = (ended_fed - ended.end_sample) * 1000 / RATE
    assert settings.BOT_END_OF_SPEECH_MS <= end_wait_ms <= settings.BOT_END_OF_SPEECH_MS + 60
    # The utterance holds all the speech, and the speculative audio is the same audio.
    assert ended.start_sample == started.sample
    assert len(ended.audio) >= len(question)
    assert paused.end_sample == ended.end_sample
    assert np.array_equal(paused.audio, ended.audio)


def test_vad_keeps_a_short_pause_inside_one_utterance() -> None:
    first, second = spoken("What is the capital"), spoken("of France?")
    events = run_vad(np.concatenate([silence(0.3), first, silence(0.15), second, silence(0.8)]))

    ended = [event for _, event in events if isinstance(event, speech.SpeechEnded)]
    paused = [event for _, event in events if isinstance(event, speech.SpeechPaused)]
    assert len(ended) == 1
    assert len(ended[0].audio) >= len(first) + len(second)
    # The pause was offered for speculative recognition, but the end is later: that guess is discarded.
    assert paused[0].end_sample < ended[0].end_sample


def test_vad_separates_utterances_after_a_long_pause() -> None:
    audio = np.concatenate([silence(0.3), spoken("Hello there."), silence(1.0), spoken("How are you?"), silence(0.8)])

    ended = [event for _, event in run_vad(audio) if isinstance(event, speech.SpeechEnded)]

    assert len(ended) == 2


@pytest.mark.parametrize("level", [0, 300, 1000, 3000, 8000])
def test_vad_hears_nothing_in_silence_or_noise(level: int) -> None:
    noise = (np.random.default_rng(level).standard_normal(3 * RATE) * level).astype(np.int16)

    assert run_vad(noise) == []


def test_vad_ignores_clicks() -> None:
    click = np.zeros(int(0.3 * RATE), dtype=np.int16)
    click[:80] = 20000  # 5 ms
    audio = np.concatenate([silence(0.2)] + [click] * 6)

    assert run_vad(audio) == []


# --- OpenAI-compatible speech ----------------------------------------------------------------


def openai_speech(fake: FakeOpenAI) -> SpeechSettings:
    provider = ProviderSettings(
        name="fake-speech", kind=OPENAI, base_url=fake.base_url, api_key=FAKE_API_KEY, timeout_seconds=2.0
    )
    return SpeechSettings(provider=provider, recognition_model="whisper-test", synthesis_model="tts-test", voice="alloy")


def test_speech_for_picks_offline_or_openai(fake_openai: FakeOpenAI) -> None:
    recognizer, synthesizer = speech.speech_for(SpeechSettings())
    assert isinstance(recognizer, speech.Recognizer) and isinstance(synthesizer, speech.Synthesizer)

    recognizer, synthesizer = speech.speech_for(openai_speech(fake_openai))
    assert isinstance(recognizer, speech.OpenAIRecognizer) and isinstance(synthesizer, speech.OpenAISynthesizer)

    anthropic = ProviderSettings(name="claude", kind=ANTHROPIC)
    with pytest.raises(ValueError, match="no speech endpoints"):
        speech.speech_for(SpeechSettings(provider=anthropic))


async def test_openai_synthesis_is_48k_pcm(fake_openai: FakeOpenAI) -> None:
    _, synthesizer = speech.speech_for(openai_speech(fake_openai))

    pcm = await synthesizer.synthesize("The capital of France is Paris.")

    [request] = fake_openai.requests
    assert request.path == "/v1/audio/speech"
    assert request.headers["authorization"] == f"Bearer {FAKE_API_KEY}"
    assert request.body == {
        "model": "tts-test", "voice": "alloy", "input": "The capital of France is Paris.", "response_format": "pcm"
    }
    # The fake's 24 kHz tone, 6 words long, resampled to 48 kHz.
    assert pcm.dtype == np.int16
    assert len(pcm) == pytest.approx(6 * SPEECH_SECONDS_PER_WORD * speech.OUTPUT_RATE, rel=0.01)
    assert np.abs(pcm).max() > 4000


async def test_openai_recognition_sends_wav(fake_openai: FakeOpenAI) -> None:
    fake_openai.transcription_text = " What is the capital of France? "
    recognizer, _ = speech.speech_for(openai_speech(fake_openai))
    audio = spoken("What is the capital of France?")

    text = await recognizer.transcribe(audio)

    assert text == "What is the capital of France?"
    [request] = fake_openai.requests
    assert request.path == "/v1/audio/transcriptions"
    assert request.body["model"] == "whisper-test"
    assert request.body["language"] == "en"
    with wave.open(io.BytesIO(request.files["file"])) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (RATE, 1, 2)
        assert np.array_equal(np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2"), audio)


async def test_openai_speech_failures_are_provider_errors_without_the_key(fake_openai: FakeOpenAI) -> None:
    recognizer, synthesizer = speech.speech_for(openai_speech(fake_openai))
    fake_openai.fail_next(2, status=401)

    with pytest.raises(ProviderError, match="speech synthesis failed: the provider answered HTTP 401") as synthesis:
        await synthesizer.synthesize("Hello.")
    with pytest.raises(ProviderError, match="speech recognition failed") as recognition:
        await recognizer.transcribe(silence(0.5))

    for error in (synthesis.value, recognition.value):
        assert FAKE_API_KEY not in str(error)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_openai_speech_unreachable() -> None:
    provider = ProviderSettings(name="gone", kind=OPENAI, base_url=f"http://127.0.0.1:{closed_port()}/v1", timeout_seconds=0.5)
    recognizer, synthesizer = speech.speech_for(SpeechSettings(provider=provider))

    with pytest.raises(ProviderError, match="gone: speech synthesis failed: could not connect"):
        await synthesizer.synthesize("Hello.")
    with pytest.raises(ProviderError, match="gone: speech recognition failed: could not connect"):
        await recognizer.transcribe(silence(0.5))
