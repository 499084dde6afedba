"""The bot's audio over WebRTC: its voice out (Speaker) and people's voices in (pump)."""

import asyncio
import fractions
import time
from collections import deque
from collections.abc import Callable

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

SAMPLE_RATE = 48000
FRAME_SAMPLES = 960  # 20 ms
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
INPUT_RATE = 16000
# Frames a track may hold for a reader that fell behind; older ones are dropped,
# so a slow connection hears the bot late by at most this much, not more and more.
TRACK_BUFFER_FRAMES = 5
# After a stall longer than this (a busy event loop), the clock starts afresh
# instead of sending every missed frame at once.
MAX_CLOCK_LAG_SECONDS = 0.1

_SILENCE = np.zeros(FRAME_SAMPLES, dtype=np.int16)


def _resolve(future: asyncio.Future, value: object) -> None:
    # A waiter that was cancelled cancels the future it waited on.
    if not future.done():
        future.set_result(value)


class Playback:
    """One piece of audio given to Speaker.play."""

    def __init__(self, pcm: np.ndarray) -> None:
        loop = asyncio.get_running_loop()
        self.pcm = pcm
        # time.monotonic() when its first frame went out; None if stopped before.
        self.started: asyncio.Future[float | None] = loop.create_future()
        # True once its last frame went out; False if stop() dropped it.
        self.finished: asyncio.Future[bool] = loop.create_future()


class SpeakerTrack(MediaStreamTrack):
    """The bot's voice for one peer connection."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self._frames: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        self._pts = 0

    def push(self, pcm: np.ndarray) -> None:
        if self._frames.qsize() >= TRACK_BUFFER_FRAMES:
            self._frames.get_nowait()
        self._frames.put_nowait(pcm)

    def drop_buffered(self) -> None:
        while not self._frames.empty():
            self._frames.get_nowait()

    def stop(self) -> None:
        super().stop()
        self.drop_buffered()
        self._frames.put_nowait(None)  # wakes a recv() waiting for a frame

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        pcm = await self._frames.get()
        if pcm is None:
            raise MediaStreamError
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += FRAME_SAMPLES
        return frame


class Speaker:
    """The bot's voice in one lobby: a 20 ms clock that sends the next frame of
    queued speech, or silence, to every peer connection's track at once."""

    def __init__(self) -> None:
        self._queue: deque[Playback] = deque()
        self._offset = 0  # samples of the queue's first playback already sent
        self._tracks: set[SpeakerTrack] = set()
        self._clock: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._clock = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._clock is not None:
            self._clock.cancel()
            await asyncio.gather(self._clock, return_exceptions=True)
        self.stop()
        for track in list(self._tracks):
            self.remove_track(track)

    def track(self) -> SpeakerTrack:
        """A new outgoing audio track, for one RTCPeerConnection."""
        track = SpeakerTrack()
        self._tracks.add(track)
        return track

    def remove_track(self, track: MediaStreamTrack) -> None:
        self._tracks.discard(track)  # type: ignore[arg-type]
        track.stop()

    @property
    def is_speaking(self) -> bool:
        return bool(self._queue)

    def play(self, pcm48k: np.ndarray) -> Playback:
        """Queues int16 48 kHz mono audio after what is already queued."""
        playback = Playback(pcm48k)
        self._queue.append(playback)
        return playback

    def stop(self) -> None:
        """Barge-in: drops everything queued; the next frame out is silence."""
        for playback in self._queue:
            _resolve(playback.started, None)
            _resolve(playback.finished, False)
        self._queue.clear()
        self._offset = 0
        for track in self._tracks:
            track.drop_buffered()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        tick = loop.time()
        while True:
            tick += FRAME_SECONDS
            delay = tick - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -MAX_CLOCK_LAG_SECONDS:
                tick = loop.time()
            pcm = self._next_frame()
            for track in self._tracks:
                track.push(pcm)

    def _next_frame(self) -> np.ndarray:
        if not self._queue:
            return _SILENCE
        frame = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        filled = 0
        now = time.monotonic()
        while filled < FRAME_SAMPLES and self._queue:
            playback = self._queue[0]
            _resolve(playback.started, now)
            taken = playback.pcm[self._offset : self._offset + FRAME_SAMPLES - filled]
            frame[filled : filled + len(taken)] = taken
            filled += len(taken)
            self._offset += len(taken)
            if self._offset >= len(playback.pcm):
                self._queue.popleft()
                self._offset = 0
                _resolve(playback.finished, True)
        return frame


async def pump(track: MediaStreamTrack, on_pcm: Callable[[np.ndarray], None]) -> None:
    """Hands a remote audio track to `on_pcm` as int16 16 kHz mono, frame by frame, until it ends."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=INPUT_RATE)
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        for resampled in resampler.resample(frame):
            on_pcm(resampled.to_ndarray().reshape(-1))
