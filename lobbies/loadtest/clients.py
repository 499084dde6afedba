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
from pathlib import Path

import websockets

from lobbies.loadtest.servers import Target

MARKER = re.compile(r"k=(\d+) s=(\d+) t=([0-9.]+)")
# Chromium's audio offer, as it created it, with the server-reflexive and relay
# candidates a browser using STUN and TURN adds: 3.2 KB. Real text matters to
# the compression figures: synthetic SDP compresses far better.
SDP = (Path(__file__).parent / "chromium-offer.sdp").read_bytes().decode()
CANDIDATE = {"candidate": "candidate:3188928557 1 udp 2122194687 192.0.2.2 46589 typ host generation 0 ufrag darm "
             "network-id 3 network-cost 50", "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "darm"}
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
    # What the server sent to these clients as it went over the wire
    # (compressed or not, frame headers included).
    bytes_received: int = 0

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


class CountingConnection(websockets.ClientConnection):
    """Counts the bytes the server sends after the handshake, for the compression figures."""

    tally: Tally | None = None

    def data_received(self, data: bytes) -> None:
        if self.tally is not None:
            self.tally.bytes_received += len(data)
        super().data_received(data)


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
        """Open the lobby WebSocket (on process `server_index` if given) and wait for the welcome."""
        url = self.target.ws_url(self.index if server_index is None else server_index, self.lobby, self.token)
        self.socket = await websockets.connect(
            url,
            open_timeout=60,
            ping_interval=None,
            compression="deflate" if self.target.compression else None,
            max_size=2**20,
            max_queue=None,
            create_connection=CountingConnection,
        )
        self.socket.tally = self.tally
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
