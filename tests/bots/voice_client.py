"""A person in a lobby with a real WebRTC stack (aiortc) instead of a browser:
it speaks prepared audio into the call and keeps the loudness of what it hears."""

import asyncio
import fractions
import json
import time
from dataclasses import dataclass, field

import av
import numpy as np
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from tests.conftest import LiveServer, http_json

RATE = 48000
FRAME = 960  # 20 ms


class Microphone(MediaStreamTrack):
    """Plays queued 48 kHz mono PCM in real time, silence otherwise."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.queue = np.zeros(0, dtype=np.int16)
        self.pts = 0
        self.started: float | None = None
        # When the last queued sample goes out (monotonic), for latency measurements.
        self.speech_ends_at: float | None = None
        self.speech_starts_at: float | None = None

    def say(self, pcm: np.ndarray) -> None:
        now = time.monotonic()
        self.speech_starts_at = now + len(self.queue) / RATE
        self.queue = np.concatenate([self.queue, pcm.astype(np.int16)])
        self.speech_ends_at = now + len(self.queue) / RATE

    async def recv(self) -> av.AudioFrame:
        if self.started is None:
            self.started = time.monotonic()
        wait = self.started + self.pts / RATE - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk, self.queue = self.queue[:FRAME], self.queue[FRAME:]
        chunk = np.pad(chunk, (0, FRAME - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self.pts
        frame.time_base = fractions.Fraction(1, RATE)
        self.pts += FRAME
        return frame


@dataclass
class Heard:
    at: float  # monotonic
    rms: float


@dataclass
class VoiceClient:
    server: LiveServer
    name: str
    id: str = ""
    token: str = ""
    microphone: Microphone = field(default_factory=Microphone)
    heard: list[Heard] = field(default_factory=list)
    chats: list[dict] = field(default_factory=list)
    frames: list[dict] = field(default_factory=list)
    peers: dict[str, RTCPeerConnection] = field(default_factory=dict)

    def __post_init__(self) -> None:
        session = http_json(f"{self.server.http}/api/sessions/", {"name": self.name})
        self.id, self.token = session["id"], session["token"]

    async def join(self, lobby: str) -> dict:
        self.socket = await websockets.connect(f"{self.server.ws}/ws/lobby/{lobby}/?token={self.token}", open_timeout=10)
        welcome = json.loads(await asyncio.wait_for(self.socket.recv(), 10))
        self.task = asyncio.create_task(self.listen())
        for peer in welcome["peers"]:
            await self.peer_joined(peer)
        return welcome

    async def leave(self) -> None:
        await self.socket.close()
        self.task.cancel()
        for pc in self.peers.values():
            await pc.close()

    async def listen(self) -> None:
        async for raw in self.socket:
            frame = json.loads(raw)
            self.frames.append(frame)
            if frame["type"] == "peer_joined":
                await self.peer_joined(frame["peer"])
            elif frame["type"] == "offer":
                await self.accept_offer(frame["from"], frame["sdp"])
            elif frame["type"] == "answer" and frame["from"] in self.peers:
                await self.peers[frame["from"]].setRemoteDescription(RTCSessionDescription(frame["sdp"], "answer"))
            elif frame["type"] == "chat":
                self.chats.append(frame)

    def describe(self) -> str:
        """What a failing test should show: the frames received and the peer connections' states."""
        frames = [f"{frame['type']}{' from ' + frame['from'][:8] if 'from' in frame else ''}" for frame in self.frames]
        links = {peer_id[:8]: (pc.signalingState, pc.iceConnectionState, pc.connectionState) for peer_id, pc in self.peers.items()}
        return f"frames received: {frames}; peer connections: {links}"

    async def peer_joined(self, peer: dict) -> None:
        # The protocol's rule: of each pair, the smaller peer id offers.
        if self.id < peer["peer_id"]:
            pc = self.new_connection(peer["peer_id"])
            pc.addTrack(self.microphone)
            await pc.setLocalDescription(await pc.createOffer())
            await self.socket.send(json.dumps({"type": "offer", "to": peer["peer_id"], "sdp": pc.localDescription.sdp}))

    async def accept_offer(self, peer_id: str, sdp: str) -> None:
        pc = self.new_connection(peer_id)
        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        pc.addTrack(self.microphone)
        await pc.setLocalDescription(await pc.createAnswer())
        await self.socket.send(json.dumps({"type": "answer", "to": peer_id, "sdp": pc.localDescription.sdp}))

    def new_connection(self, peer_id: str) -> RTCPeerConnection:
        if peer_id in self.peers:
            asyncio.ensure_future(self.peers.pop(peer_id).close())
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.peers[peer_id] = pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            asyncio.ensure_future(self.record(track))

        return pc

    async def record(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            samples = frame.to_ndarray().astype(np.float64)
            self.heard.append(Heard(at=time.monotonic(), rms=float(np.sqrt(np.mean(samples**2)))))

    def loud_since(self, since: float, threshold: float = 300.0) -> Heard | None:
        """The first frame heard after `since` louder than silence."""
        return next((heard for heard in self.heard if heard.at >= since and heard.rms > threshold), None)

    def quiet_from(self, since: float, threshold: float = 300.0, frames: int = 15) -> float | None:
        """When the sound heard after `since` fell silent for good (`frames` quiet frames in a row)."""
        run_start, run = None, 0
        for heard in self.heard:
            if heard.at < since:
                continue
            if heard.rms <= threshold:
                run_start = heard.at if run == 0 else run_start
                run += 1
                if run >= frames:
                    return run_start
            else:
                run = 0
        return None
