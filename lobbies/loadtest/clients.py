"""The load generator's clients: a session over HTTP, then the lobby WebSocket.

Every message the generator sends carries a marker `k=<step> s=<sender> t=<time>`
(in an extra field of offers, answers and ICE, which the server relays as
sent, and at the start of chat text), so a receiver can attribute it to a
step and measure its relay latency without decoding the whole frame.
"""

import asyncio
import json
import re
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import websockets

from lobbies.loadtest.servers import Target

MARKER = re.compile(r"k=(\d+) s=(\d+) t=([0-9.]+)")
# SDP of a browser's audio-only offer is 3-5 KB; ICE candidates about 200 bytes.
SDP = ("v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n" + "a=candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host\r\n" * 70)[:4000]
CANDIDATE = {"candidate": "candidate:842163049 1 udp 1677729535 192.0.2.1 54321 typ srflx raddr 0.0.0.0 rport 0",
             "sdpMid": "0", "sdpMLineIndex": 0}
SDP_JSON = json.dumps(SDP)
CANDIDATE_JSON = json.dumps(CANDIDATE)


@dataclass
class Step:
    """What receivers saw of one step of load."""

    number: int
    received: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class Tally:
    """Shared by all clients of one measurement."""

    steps: dict[int, Step] = field(default_factory=dict)
    errors: Counter = field(default_factory=Counter)

    def step(self, number: int) -> Step:
        self.steps[number] = Step(number)
        return self.steps[number]


def create_sessions(target: Target, count: int) -> list[str]:
    """Tokens of `count` new sessions (none for the reference relay), created 16 at a time."""
    if target.reference:
        return [""] * count

    def create(index: int) -> str:
        request = urllib.request.Request(
            f"{target.http_url(index)}/api/sessions/",
            data=json.dumps({"name": f"Load {index}"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["token"]

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(create, range(count)))


def create_lobby(target: Target, token: str, name: str, size: int) -> None:
    if target.reference:
        return
    request = urllib.request.Request(
        f"{target.http_url(0)}/api/lobbies/",
        data=json.dumps({"name": name, "max_participants": size}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


class LoadClient:
    def __init__(self, target: Target, index: int, lobby: str, token: str, tally: Tally) -> None:
        self.target = target
        self.index = index
        self.lobby = lobby
        self.token = token
        self.tally = tally
        self.socket: websockets.ClientConnection | None = None
        self.peer_id = ""
        # Peers this client's server has announced: the welcome's and each peer_joined since.
        self.peers_known = 0
        self.reader: asyncio.Task | None = None

    async def connect(self, server_index: int | None = None) -> None:
        """Open the lobby WebSocket and wait for the welcome."""
        url = self.target.ws_url(self.index if server_index is None else server_index, self.lobby, self.token)
        self.socket = await websockets.connect(
            url, open_timeout=60, ping_interval=None, compression=None, max_size=2**20, max_queue=None
        )
        welcome = json.loads(await asyncio.wait_for(self.socket.recv(), 60))
        if welcome.get("type") != "welcome":
            raise RuntimeError(f"no welcome: {welcome}")
        self.peer_id = welcome["peer_id"]
        self.peers_known = len(welcome.get("peers", []))
        self.reader = asyncio.create_task(self.read(self.socket))

    async def read(self, socket: websockets.ClientConnection) -> None:
        try:
            async for text in socket:
                self.on_frame(text)
        except websockets.ConnectionClosed:
            pass

    def on_frame(self, text: str) -> None:
        now = time.time()
        head = text[:160] if text[10:14] != "chat" else text[:400]
        found = MARKER.search(head)
        if found is not None:
            step = self.tally.steps.get(int(found[1]))
            if step is not None and int(found[2]) != self.index:
                step.received += 1
                step.latencies.append(now - float(found[3]))
        elif text.startswith('{"type": "peer_joined"'):
            self.peers_known += 1
        elif text.startswith('{"type": "error"'):
            self.tally.errors[json.loads(text)["code"]] += 1

    async def send_signal(self, kind: str, to: str, step: int) -> None:
        marker = f'"m": "k={step} s={self.index} t={time.time():.6f}"'
        if kind == "ice":
            text = f'{{"type": "ice", "to": "{to}", {marker}, "candidate": {CANDIDATE_JSON}}}'
        else:
            text = f'{{"type": "{kind}", "to": "{to}", {marker}, "sdp": {SDP_JSON}}}'
        await self.socket.send(text)

    async def send_chat(self, step: int) -> None:
        await self.socket.send(
            f'{{"type": "chat", "text": "k={step} s={self.index} t={time.time():.6f} how is everyone doing today?"}}'
        )

    def drop(self) -> None:
        """Lose the connection as a dead network would: no close handshake."""
        if self.socket is not None:
            self.socket.transport.abort()

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        if self.reader is not None:
            await self.reader
