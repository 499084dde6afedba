"""One bot in one lobby.

The bot takes part exactly as a browser does: it opens the lobby WebSocket
with its session token, follows the same signaling rules (of each pair the
smaller peer id offers; an incoming offer always starts a fresh connection),
and holds an aiortc peer connection to every person. Audio from each person
goes to the voice pipeline; the pipeline's voice goes to everyone.
"""

import asyncio
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aioice.ice
import websockets
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from aiortc.sdp import candidate_from_sdp
from django.conf import settings

from bots.audio import Speaker, pump
from bots.config import BotProfile
from bots.pipeline import TurnRecord, VoicePipeline
from bots.services import Claim

logger = logging.getLogger(__name__)

# The server's close codes that end a bot's attempts (see docs/protocol.md).
CLOSE_REPLACED = 4409
CLOSE_KICKED = 4008
# How long an offer may go unanswered before the offering side tries again.
OFFER_RETRY_SECONDS = 8.0
OFFER_RETRY_MAX_SECONDS = 30.0
RECONNECT_MAX_SECONDS = 30.0
HANDSHAKE_SECONDS = 10.0


def use_host_addresses(addresses: list[str]) -> None:
    """Offer exactly these host addresses in ICE (aioice otherwise skips
    loopback, which leaves a loopback-only host with no candidates at all)."""
    if addresses:
        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(addresses)


def ice_configuration() -> RTCConfiguration:
    # An explicit list, even an empty one: aiortc's default is a public STUN server.
    return RTCConfiguration(iceServers=[RTCIceServer(**server) for server in settings.VOICEBOT_ICE_SERVERS])


def mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, re.IGNORECASE) is not None


class RunnerEnded(Exception):
    """The bot must not come back to this lobby on its own (kicked, or replaced by another worker)."""


class Refused(Exception):
    """The server turned the bot away for now; it tries again later."""


@dataclass
class Link:
    """The peer connection to one person."""

    peer_id: str
    pc: RTCPeerConnection
    track: MediaStreamTrack
    pending_candidates: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)


@dataclass
class Person:
    peer_id: str
    name: str
    state: str
    greeted: bool = False


class BotRunner:
    """Runs one claimed assignment until cancelled; reconnects after drops."""

    def __init__(
        self,
        *,
        claim: Claim,
        profile: BotProfile,
        server_url: str,
        on_status: Callable[[str, str], Awaitable[None]],
        on_turn: Callable[[TurnRecord], Awaitable[None]],
        on_kicked: Callable[[], Awaitable[None]],
    ) -> None:
        self.claim = claim
        self.profile = profile
        self.url = f"{server_url.rstrip('/')}/ws/lobby/{quote(claim.lobby_name)}/?token={quote(claim.token)}"
        self.on_status = on_status
        self.on_turn = on_turn
        self.on_kicked = on_kicked
        self.websocket: websockets.ClientConnection | None = None
        self.people: dict[str, Person] = {}
        self.links: dict[str, Link] = {}

    @property
    def peer_id(self) -> str:
        return self.claim.session_id

    async def run(self) -> None:
        self.speaker = Speaker()
        await self.speaker.start()
        self.pipeline = VoicePipeline(
            profile=self.profile,
            speaker=self.speaker,
            send_chat=self.send_chat,
            on_turn=self.on_turn,
            on_status=self.on_status,
        )
        await self.pipeline.start()
        try:
            await self.stay()
        finally:
            await self.leave()
            await self.pipeline.close()
            await self.speaker.close()

    async def stay(self) -> None:
        attempt = 0
        while True:
            try:
                async with websockets.connect(
                    self.url, open_timeout=HANDSHAKE_SECONDS, max_size=2**20, ping_interval=20
                ) as websocket:
                    self.websocket = websocket
                    try:
                        await self.take_part(websocket)
                    except asyncio.CancelledError:
                        # Removed or stopping: leave with 1000 now, or the context
                        # manager closes with 1011, which the server takes for a drop.
                        await self.leave()
                        raise
                    attempt = 0
            except websockets.ConnectionClosed as closed:
                await self.closed(closed.rcvd.code if closed.rcvd else None, closed.rcvd.reason if closed.rcvd else "")
            except Refused as refused:
                await self.on_status("error", str(refused))
            except (OSError, TimeoutError, websockets.InvalidHandshake) as error:
                await self.on_status("error", f"Cannot reach the server: {error}")
            finally:
                self.websocket = None
                await self.drop_links()
            attempt += 1
            await asyncio.sleep(min(RECONNECT_MAX_SECONDS, 0.5 * 2**attempt) * random.uniform(0.8, 1.2))

    async def closed(self, code: int | None, reason: str) -> None:
        if code == CLOSE_KICKED:
            await self.on_kicked()
            raise RunnerEnded("kicked out by an administrator")
        if code == CLOSE_REPLACED:
            raise RunnerEnded("another connection took the bot's place")
        await self.on_status("error", f"Disconnected from the lobby (close code {code}) {reason}".strip())

    async def leave(self) -> None:
        """Leave the lobby for good: close code 1000 is a deliberate leave."""
        websocket = self.websocket
        if websocket is not None:
            try:
                await asyncio.wait_for(websocket.close(1000), timeout=5)
            except Exception:
                logger.warning("Bot %s could not leave lobby %s cleanly", self.profile.name, self.claim.lobby_name)
        await self.drop_links()

    async def take_part(self, websocket: websockets.ClientConnection) -> None:
        welcome = json.loads(await asyncio.wait_for(websocket.recv(), timeout=HANDSHAKE_SECONDS))
        if welcome.get("type") != "welcome":
            # Refused (the lobby is full or closed): the error frame says why, a close follows.
            raise Refused(welcome.get("message", "The server refused the bot."))
        await self.on_status("in_room", "")
        self.people = {}
        for peer in welcome["peers"]:
            await self.peer_joined(peer)
        async for raw in websocket:
            await self.handle(json.loads(raw))

    async def handle(self, frame: dict[str, Any]) -> None:
        handler = {
            "peer_joined": lambda: self.peer_joined(frame["peer"]),
            "peer_left": lambda: self.peer_left(frame["peer_id"]),
            "peer_updated": lambda: self.peer_updated(frame["peer"]),
            "offer": lambda: self.accept_offer(frame["from"], frame["sdp"]),
            "answer": lambda: self.accept_answer(frame["from"], frame["sdp"]),
            "ice": lambda: self.add_candidate(frame["from"], frame.get("candidate")),
            "chat": lambda: self.chat(frame),
        }.get(frame.get("type", ""))
        if handler is not None:
            try:
                await handler()
            except Exception:
                # One person's broken negotiation must not end the bot's stay.
                logger.exception("Bot %s failed to handle %s", self.profile.name, frame.get("type"))
        elif frame.get("type") == "error":
            logger.warning("Bot %s got error %s: %s", self.profile.name, frame.get("code"), frame.get("message"))

    # --- People -------------------------------------------------------------

    async def peer_joined(self, peer: dict[str, Any]) -> None:
        if peer.get("bot"):
            return
        known = self.people.get(peer["peer_id"])
        self.people[peer["peer_id"]] = Person(
            peer_id=peer["peer_id"], name=peer["name"], state=peer.get("state", "connected"),
            greeted=known.greeted if known else False,
        )
        if self.should_offer(peer) and peer["peer_id"] not in self.links:
            await self.offer(peer["peer_id"])

    async def peer_updated(self, peer: dict[str, Any]) -> None:
        previous = self.people.get(peer["peer_id"])
        if previous is None:
            return
        back = previous.state == "reconnecting" and peer.get("state") == "connected"
        previous.state = peer.get("state", "connected")
        # Back from reconnecting, it dropped its peer connections: rebuild ours.
        if back and self.should_offer(peer):
            await self.offer(peer["peer_id"])

    async def peer_left(self, peer_id: str) -> None:
        self.people.pop(peer_id, None)
        await self.close_link(peer_id)
        self.pipeline.peer_left(peer_id)

    def should_offer(self, peer: dict[str, Any]) -> bool:
        return self.peer_id < peer["peer_id"] and peer.get("state", "connected") == "connected"

    async def chat(self, frame: dict[str, Any]) -> None:
        if frame["from"] == self.peer_id:
            return
        # The bot answers chat addressed to it by name, or everything when it is
        # alone with one person; otherwise it only listens.
        addressed = mentions(frame["text"], self.profile.name) or len(self.people) == 1
        await self.pipeline.on_chat(frame["from"], frame.get("name", ""), frame["text"], addressed)

    async def send_chat(self, text: str) -> None:
        await self.send({"type": "chat", "text": text})

    async def send(self, frame: dict[str, Any]) -> None:
        if self.websocket is not None:
            try:
                await self.websocket.send(json.dumps(frame))
            except websockets.ConnectionClosed:
                pass

    # --- WebRTC -------------------------------------------------------------

    def new_link(self, peer_id: str) -> Link:
        pc = RTCPeerConnection(ice_configuration())
        link = Link(peer_id=peer_id, pc=pc, track=self.speaker.track())
        self.links[peer_id] = link

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                link.tasks.append(asyncio.create_task(pump(track, lambda pcm: self.heard(peer_id, pcm))))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if self.links.get(peer_id) is not link:
                return
            if pc.connectionState == "connected":
                await self.greet(peer_id)
            elif pc.connectionState == "failed":
                await self.close_link(peer_id)
                person = self.people.get(peer_id)
                if person and self.should_offer({"peer_id": peer_id, "state": person.state}):
                    await self.offer(peer_id)

        return link

    def heard(self, peer_id: str, pcm: Any) -> None:
        person = self.people.get(peer_id)
        if person is not None:
            self.pipeline.feed(peer_id, person.name, pcm)

    async def greet(self, peer_id: str) -> None:
        person = self.people.get(peer_id)
        if person is not None and not person.greeted:
            person.greeted = True
            await self.pipeline.greet(person.name)

    async def close_link(self, peer_id: str) -> None:
        link = self.links.pop(peer_id, None)
        if link is None:
            return
        for task in link.tasks:
            task.cancel()
        self.speaker.remove_track(link.track)
        await link.pc.close()

    async def drop_links(self) -> None:
        for peer_id in list(self.links):
            await self.close_link(peer_id)

    async def offer(self, peer_id: str) -> None:
        await self.close_link(peer_id)
        link = self.new_link(peer_id)
        link.pc.addTrack(link.track)
        await link.pc.setLocalDescription(await link.pc.createOffer())
        # aiortc gathers every candidate before this returns: the SDP carries them.
        await self.send({"type": "offer", "to": peer_id, "sdp": link.pc.localDescription.sdp})
        link.tasks.append(asyncio.create_task(self.watch_offer(link)))

    async def watch_offer(self, link: Link) -> None:
        """The offering side rebuilds a connection that does not come up (an offer or answer got lost)."""
        wait = OFFER_RETRY_SECONDS
        await asyncio.sleep(wait)
        if self.links.get(link.peer_id) is link and link.pc.connectionState != "connected":
            logger.info("Bot %s: no connection to %s yet; offering again", self.profile.name, link.peer_id)
            await self.offer(link.peer_id)

    async def accept_offer(self, peer_id: str, sdp: str) -> None:
        if peer_id not in self.people:
            return
        await self.close_link(peer_id)
        link = self.new_link(peer_id)
        await link.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        # After the offer is applied, addTrack takes its audio transceiver.
        link.pc.addTrack(link.track)
        await link.pc.setLocalDescription(await link.pc.createAnswer())
        await self.send({"type": "answer", "to": peer_id, "sdp": link.pc.localDescription.sdp})

    async def accept_answer(self, peer_id: str, sdp: str) -> None:
        link = self.links.get(peer_id)
        # Only an offer waiting for its answer takes one.
        if link is None or link.pc.signalingState != "have-local-offer":
            return
        await link.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        for candidate in link.pending_candidates:
            await self.apply_candidate(link, candidate)
        link.pending_candidates.clear()

    async def add_candidate(self, peer_id: str, candidate: dict[str, Any] | None) -> None:
        link = self.links.get(peer_id)
        # Frames are handled in order, so a candidate with no link belongs to a
        # connection already closed; null or "" ends the peer's candidates.
        if link is None or candidate is None or not candidate.get("candidate"):
            return
        if link.pc.remoteDescription is None:
            link.pending_candidates.append(candidate)
            return
        await self.apply_candidate(link, candidate)

    async def apply_candidate(self, link: Link, candidate: dict[str, Any]) -> None:
        line = candidate["candidate"].removeprefix("candidate:")
        try:
            parsed = candidate_from_sdp(line)
            parsed.sdpMid = candidate.get("sdpMid")
            parsed.sdpMLineIndex = candidate.get("sdpMLineIndex")
            await link.pc.addIceCandidate(parsed)
        except Exception as error:
            # One unusable candidate must not stop the others.
            logger.info("Bot %s ignored an ICE candidate from %s: %s", self.profile.name, link.peer_id, error)
