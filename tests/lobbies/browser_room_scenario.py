"""Two people meet in a voice room in a real browser, over real WebRTC.

Run it inside a loopback-only network namespace (tests/lobbies/test_browser_room.py
does), from any directory:

    unshare -n -- sh -c 'ip link set lo up && exec .venv/bin/python tests/lobbies/browser_room_scenario.py'

It starts the server on the embedded default in a temporary directory, drives
Debian's chromium through the landing and room pages as Alice and Bob, and
prints one JSON object with what it measured on its last stdout line. It exits
non-zero, with the reason on stderr and in the JSON "error", when anything fails.

After the meeting itself it restarts the server on the same port and data
directory (both pages must reconnect on their own, still see each other and hear
each other again), then drops Bob's connection (Alice must see him reconnecting,
then back), loses the offer that would rebuild their connection (the offering
page must offer again), then reloads Bob's page (Alice must see the same Bob
back), opens a second tab as Bob (it takes over, the first stops for good),
and Bob leaves (Alice must see him go at once).

Last, Alice creates a lobby with a password on the landing page and lands in
it without typing the password again; Bob opens its link, is asked for the
password, gives a wrong one (asked again), then the right one, and they hear
each other. There Bob's page is shown an administrator's mute (played into
its socket: the page must mute itself without answering), a quick mute-unmute
must not flicker, and a kick and a closed lobby (played in too) must stop the
pages for good with the right words.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOBBY = "e2e-room"
SECRET_LOBBY = "e2e-secret"
# A space, an '&' and non-ASCII letters: the page must percent-encode it as UTF-8.
SECRET_PASSWORD = "open sesame & süß"
WRONG_PASSWORD = "open says me"
CHAT_TEXT = "Hello Bob <b>not bold</b> & welcome"
# Sent while Bob is away: his page fetches it when he is back.
MISSED_CHAT_TEXT = "Said while you were away"
DELIVERY_FAILED = {"type": "error", "code": "delivery_failed", "message": "That peer cannot receive messages right now."}

SERVER_START_TIMEOUT = 30
# Every browser action and assertion waits at most this long.
STEP_TIMEOUT_MS = 15_000
# From both people being in the room to audio flowing both ways.
AUDIO_TIMEOUT = 30
BYTES_GROWTH_WINDOW = 2.0
# From the server answering again (or Bob's reload) to both pages connected and
# hearing each other on fresh peer connections. The pages' backoff is capped at
# 15 s, and the server is down for a few seconds only.
RECONNECT_TIMEOUT = 30
# Well under the server's resume grace period (30 s): a leave is not a drop.
LEAVE_TIMEOUT_MS = 5_000
# The room page greys its participants and chat with this class while it reconnects.
STALE = re.compile(r"\bstale\b")

# Sums inbound audio and lists the ICE candidate pairs in use, per peer connection.
PROBE_JS = """
async () => {
  const room = window.voicebotRoom;
  const result = { now: Date.now(), selfId: room ? room.selfId : null, peers: [] };
  if (!room) return result;
  for (const { peerId, serial, pc } of room.links) {
    const stats = await pc.getStats();
    const peer = { peerId, serial, state: pc.connectionState, bytesReceived: 0, pairs: [] };
    stats.forEach((report) => {
      if (report.type === 'inbound-rtp' && report.kind === 'audio') {
        peer.bytesReceived += report.bytesReceived || 0;
      }
      if (report.type === 'candidate-pair' && (report.state === 'succeeded' || report.nominated)) {
        const local = stats.get(report.localCandidateId) || {};
        const remote = stats.get(report.remoteCandidateId) || {};
        peer.pairs.push({
          state: report.state,
          nominated: Boolean(report.nominated),
          local: local.address || local.ip || null,
          remote: remote.address || remote.ip || null,
        });
      }
    });
    result.peers.push(peer);
  }
  return result;
}
"""


# Keeps every WebSocket the page opens, so the scenario can play a server frame
# into the room page's own socket (the page cannot tell it from a real one), and
# a short summary of the frames the server sent, for the report.
SOCKET_SPY_JS = """
(() => {
  const NativeWebSocket = window.WebSocket;
  const sockets = [];
  const frames = [];
  const sent = [];
  window.__voicebotSockets = sockets;
  window.__voicebotFrames = frames;
  // What the page sent, except ICE and pings: e.g. "mute true".
  window.__voicebotSent = sent;
  window.WebSocket = class extends NativeWebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
      const socket = sockets.length;
      const send = this.send.bind(this);
      this.send = (data) => {
        const frame = JSON.parse(data);
        if (frame.type !== 'ice' && frame.type !== 'ping') sent.push([frame.type, frame.muted].filter((x) => x !== undefined).join(' '));
        send(data);
      };
      this.addEventListener('message', (event) => {
        const frame = JSON.parse(event.data);
        const peers = frame.peers || (frame.peer ? [frame.peer] : []);
        const states = peers.map((peer) => peer.state).filter(Boolean);
        const summary = [`#${socket}`, frame.type, frame.code, ...states].filter(Boolean).join(' ');
        if (frame.type !== 'pong' && frame.type !== 'ice') frames.push(summary);
      });
      this.addEventListener('close', (event) => frames.push(`#${socket} close ${event.code}`));
    }
  };
})();
"""

# Records every change of a participant's state on the page, however brief.
WATCH_PARTICIPANTS_JS = """
() => {
  const changes = [];
  window.__participantChanges = changes;
  new MutationObserver((records) => {
    for (const record of records) {
      const item = record.target;
      changes.push({ peerId: item.dataset.peerId, state: item.dataset.state });
    }
  }).observe(document.getElementById('participants'), {
    subtree: true, attributes: true, attributeFilter: ['data-state'],
  });
}
"""

# Drops the page's socket the way a network failure would look to the server (not 1000).
DROP_SOCKET_JS = "() => window.__voicebotSockets.at(-1).close(4000, 'test drop')"

# Loses the next offer the page sends, as a relay to a dead connection would.
SWALLOW_NEXT_OFFER_JS = """
() => {
  const socket = window.__voicebotSockets.at(-1);
  const send = socket.send.bind(socket);
  window.__swallowedOffers = 0;
  socket.send = (data) => {
    if (window.__swallowedOffers === 0 && JSON.parse(data).type === 'offer') {
      window.__swallowedOffers += 1;
      return;
    }
    send(data);
  };
}
"""

# Plays a server frame into the newest socket, as if the server had sent it.
INJECT_FRAME_JS = """
(frame) => {
  const socket = window.__voicebotSockets.at(-1);
  socket.dispatchEvent(new MessageEvent('message', { data: JSON.stringify(frame) }));
}
"""


class ScenarioFailure(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(data_dir: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    env.update(VOICEBOT_DATA_DIR=data_dir, DJANGO_SETTINGS_MODULE="voicebot.settings", PYTHONUNBUFFERED="1")
    return env


def start_server(data_dir: str, port: int, log_file, migrate: bool = True) -> subprocess.Popen:
    env = server_env(data_dir)
    if migrate:
        migration = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
        if migration.returncode != 0:
            raise ScenarioFailure(f"migrate failed:\n{migration.stdout}\n{migration.stderr}")
    return subprocess.Popen(
        [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "voicebot.asgi:application"],
        cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
    )


def wait_for_server(server: subprocess.Popen, base_url: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ScenarioFailure(f"daphne exited with code {server.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise ScenarioFailure(f"daphne did not answer {base_url}/healthz within {SERVER_START_TIMEOUT} s")


def stop_server(server: subprocess.Popen | None) -> None:
    if server is None or server.poll() is not None:
        return
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)


class Server:
    """The daphne process, which the scenario stops and starts again on the same port and data."""

    def __init__(self, data_dir: str, port: int, log_file) -> None:
        self.data_dir, self.port, self.log_file = data_dir, port, log_file
        self.base_url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self, migrate: bool = True) -> None:
        self.process = start_server(self.data_dir, self.port, self.log_file, migrate=migrate)
        wait_for_server(self.process, self.base_url)

    def stop(self) -> None:
        """SIGTERM, as a service manager would send."""
        stop_server(self.process)


def save_screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"browser-{name}.png"), full_page=True)


def open_landing(page: Page, base_url: str, name: str) -> float:
    """Open "/" and type the display name; returns the page's navigation start (epoch ms)."""
    page.goto(f"{base_url}/")
    page.fill("#display-name", name)
    return page.evaluate("performance.timeOrigin")


def wait_until_connected(page: Page, who: str, timeout_ms: float = STEP_TIMEOUT_MS) -> None:
    try:
        expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected", timeout=timeout_ms)
    except AssertionError:
        status = page.locator("#connection-status").text_content()
        raise ScenarioFailure(f"{who} did not connect to the lobby; status: {status!r}")


def watch_http(page: Page, who: str, results: dict) -> None:
    """Record every HTTP error answer and every POST not marked as JSON."""
    errors = results.setdefault("http_errors", [])
    posts = results.setdefault("posts", [])

    def on_response(response) -> None:
        if response.status >= 400:
            errors.append(f"{who}: {response.status} {response.request.method} {response.url}")

    def on_request(request) -> None:
        if request.method == "POST":
            posts.append(
                {
                    "who": who,
                    "path": request.url.split("/", 3)[-1],
                    "content_type": request.headers.get("content-type"),
                    "body": request.post_data,
                }
            )

    page.on("response", on_response)
    page.on("request", on_request)


def alice_creates_lobby(page: Page, base_url: str, results: dict) -> float:
    opened = open_landing(page, base_url, "Alice")
    create_max = page.locator("#create-max")
    results["create_max_value"] = create_max.get_attribute("value")
    results["create_max_limit"] = create_max.get_attribute("max")
    page.fill("#create-name", LOBBY)
    page.get_by_role("button", name="Create and join").click()
    page.wait_for_url(f"{base_url}/lobby/{LOBBY}/")
    wait_until_connected(page, "Alice")
    return opened


def bob_joins_from_list(page: Page, base_url: str) -> float:
    opened = open_landing(page, base_url, "Bob")
    join_button = page.locator("#lobby-list li", has_text=LOBBY).get_by_role("button", name=f"Join {LOBBY}")
    expect(join_button).to_be_visible()
    save_screenshot(page, "landing-bob")
    join_button.click()
    page.wait_for_url(f"{base_url}/lobby/{LOBBY}/")
    wait_until_connected(page, "Bob")
    return opened


def probe(page: Page) -> dict:
    return page.evaluate(PROBE_JS)


def audio_connected(sample: dict, newer_than: int = 0) -> bool:
    """Audio arrives on a connected peer connection built after serial `newer_than`."""
    return any(
        peer["state"] == "connected" and peer["bytesReceived"] > 0 and peer["serial"] > newer_than
        for peer in sample["peers"]
    )


def newest_serial(sample: dict) -> int:
    return max((peer["serial"] for peer in sample["peers"]), default=0)


def wait_for_audio(
    pages: dict[str, Page], newer_than: dict[str, int] | None = None, timeout: float = AUDIO_TIMEOUT
) -> dict[str, dict]:
    """Poll every page until each has connected audio (on a peer connection newer
    than the given serial, if any); returns each page's first such sample."""
    newer_than = newer_than or {}
    first: dict[str, dict] = {}
    last: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(first) < len(pages):
        if time.monotonic() > deadline:
            missing = sorted(set(pages) - set(first))
            raise ScenarioFailure(
                f"no connected audio within {timeout} s for {missing}; last probes: {json.dumps(last)}"
            )
        for who, page in pages.items():
            if who in first:
                continue
            last[who] = probe(page)
            if audio_connected(last[who], newer_than.get(who, 0)):
                first[who] = last[who]
        time.sleep(0.05)
    return first


def measure_bytes_growth(pages: dict[str, Page], results: dict, prefix: str) -> dict[str, dict]:
    before = {who: probe(page) for who, page in pages.items()}
    time.sleep(BYTES_GROWTH_WINDOW)
    after = {who: probe(page) for who, page in pages.items()}
    for who in pages:
        results[f"{prefix}{who}_bytes_before"] = received_bytes(before[who])
        results[f"{prefix}{who}_bytes_after"] = received_bytes(after[who])
        results[f"{prefix}{who}_peer_states"] = [peer["state"] for peer in after[who]["peers"]]
    return after


def epoch_ms() -> int:
    """The same clock as the pages' Date.now(): all run on this machine."""
    return round(time.time() * 1000)


def received_bytes(sample: dict) -> int:
    return sum(peer["bytesReceived"] for peer in sample["peers"])


def used_candidate_addresses(sample: dict) -> list[str]:
    pairs = [pair for peer in sample["peers"] for pair in peer["pairs"]]
    return sorted({str(pair[end]) for pair in pairs for end in ("local", "remote")})


def check(results: dict, name: str, assertion) -> None:
    """Record one user-visible check as a boolean instead of stopping at the first miss."""
    try:
        assertion()
        results[name] = True
    except (AssertionError, PlaywrightError) as error:
        results[name] = False
        results.setdefault("check_errors", {})[name] = str(error).splitlines()[0]


def participant(page: Page, peer_id: str):
    return page.locator(f'#participants li[data-peer-id="{peer_id}"]')


def shows_connected_peer(page: Page, peer_id: str, name: str) -> None:
    item = participant(page, peer_id)
    expect(item).to_contain_text(name)
    expect(item).to_have_attribute("data-state", "connected")
    expect(item.locator(".badge-reconnecting")).to_be_hidden()


def status_history(page: Page) -> list[dict]:
    return page.evaluate("window.voicebotRoom.statusLog")


def server_restart(pages: dict[str, Page], server: Server, ids: dict[str, str], results: dict) -> None:
    """SIGTERM the server and start it again: both pages come back on their own."""
    alice = pages["alice"]
    names = {"alice": "Alice", "bob": "Bob"}
    other = {"alice": "bob", "bob": "alice"}
    serials = {who: newest_serial(probe(page)) for who, page in pages.items()}
    log_start = {who: len(status_history(page)) for who, page in pages.items()}
    frames_start = {who: page.evaluate("window.__voicebotFrames.length") for who, page in pages.items()}

    server.stop()
    stopped = epoch_ms()
    for who, page in pages.items():
        check(
            results,
            f"restart_{who}_shows_reconnecting",
            lambda page=page: (
                expect(page.locator("#connection-status")).to_have_attribute("data-state", "reconnecting"),
                expect(page.locator("#connection-status")).to_contain_text("Reconnecting… (attempt"),
            ),
        )
        # The room stays on screen, greyed, while the page tries to come back.
        check(
            results,
            f"restart_{who}_keeps_room_while_reconnecting",
            lambda page=page, who=who: (
                expect(participant(page, ids[other[who]])).to_contain_text(names[other[who]]),
                expect(page.locator("#room-ui")).to_have_class(STALE),
                expect(page.locator("#chat-log")).to_contain_text(CHAT_TEXT),
                expect(page.locator("#chat-input")).to_be_disabled(),
            ),
        )
        save_screenshot(page, f"reconnecting-{who}")

    server.start(migrate=False)
    restarted = epoch_ms()
    results["restart_server_down_ms"] = restarted - stopped
    # No click: each page must get there by itself.
    for who, page in pages.items():
        wait_until_connected(page, who, timeout_ms=RECONNECT_TIMEOUT * 1000)
    first = wait_for_audio(pages, newer_than=serials, timeout=RECONNECT_TIMEOUT)
    for who in pages:
        results[f"restart_{who}_to_audio_ms"] = first[who]["now"] - restarted
        results[f"restart_{who}_same_peer_id"] = first[who]["selfId"] == ids[who]
        log = status_history(pages[who])[log_start[who]:]
        results[f"restart_{who}_status_log"] = [entry["text"] for entry in log]
        results[f"restart_{who}_attempts"] = sum(entry["state"] == "reconnecting" for entry in log)
        results[f"restart_{who}_frames"] = pages[who].evaluate("window.__voicebotFrames")[frames_start[who]:]
        results[f"restart_{who}_reconnected_after_reconnecting"] = (
            any(entry["state"] == "reconnecting" for entry in log) and log[-1]["state"] == "connected"
        )
        check(
            results,
            f"restart_{who}_sees_{other[who]}",
            lambda who=who: shows_connected_peer(pages[who], ids[other[who]], names[other[who]]),
        )
        check(
            results,
            f"restart_{who}_room_not_stale",
            lambda who=who: (
                expect(pages[who].locator("#room-ui")).not_to_have_class(STALE),
                expect(pages[who].locator("#chat-input")).to_be_enabled(),
                expect(participant(pages[who], ids[who])).to_have_attribute("data-state", "connected"),
            ),
        )
    check(
        results,
        "restart_bob_mute_kept",
        lambda: expect(participant(alice, ids["bob"]).locator(".badge-muted")).to_be_visible(),
    )
    measure_bytes_growth(pages, results, "restart_")
    for who, page in pages.items():
        save_screenshot(page, f"restarted-{who}")


def bob_drops(pages: dict[str, Page], ids: dict[str, str], results: dict) -> None:
    """Bob's connection drops and he cannot come back for a moment: Alice sees him
    reconnecting, then back, and they hear each other again."""
    alice, bob = pages["alice"], pages["bob"]
    serials = {who: newest_serial(probe(page)) for who, page in pages.items()}
    resume = "**/api/sessions/resume/"
    bob.route(resume, lambda route: route.abort())
    try:
        dropped = epoch_ms()
        bob.evaluate(DROP_SOCKET_JS)
        bob_item = participant(alice, ids["bob"])
        check(
            results,
            "drop_alice_sees_bob_reconnecting",
            lambda: (
                expect(bob_item).to_have_attribute("data-state", "reconnecting"),
                expect(bob_item.locator(".badge-reconnecting")).to_be_visible(),
            ),
        )
        check(
            results,
            "drop_bob_shows_reconnecting",
            lambda: expect(bob.locator("#connection-status")).to_contain_text("Reconnecting… (attempt"),
        )
        alice.fill("#chat-input", MISSED_CHAT_TEXT)
        alice.press("#chat-input", "Enter")
        # Her own copy back is the server's word that it is stored.
        expect(alice.locator("#chat-log .chat-text", has_text=MISSED_CHAT_TEXT)).to_have_count(1)
        for who, page in pages.items():
            save_screenshot(page, f"dropped-{who}")
    finally:
        bob.unroute(resume)
    wait_until_connected(bob, "Bob", timeout_ms=RECONNECT_TIMEOUT * 1000)
    check(results, "drop_alice_sees_bob_back", lambda: shows_connected_peer(alice, ids["bob"], "Bob"))
    check(
        results,
        "drop_bob_fetched_missed_chat_once",
        lambda: expect(bob.locator("#chat-log .chat-text", has_text=MISSED_CHAT_TEXT)).to_have_count(1),
    )
    first = wait_for_audio(pages, newer_than=serials, timeout=RECONNECT_TIMEOUT)
    for who in pages:
        results[f"drop_{who}_to_audio_ms"] = first[who]["now"] - dropped
    results["drop_bob_same_peer_id"] = first["bob"]["selfId"] == ids["bob"]
    measure_bytes_growth(pages, results, "drop_")


def offer_lost(pages: dict[str, Page], ids: dict[str, str], results: dict) -> None:
    """The offer that would rebuild a connection is lost: the offering page sends another."""
    offerer = "alice" if ids["alice"] < ids["bob"] else "bob"
    answerer = "bob" if offerer == "alice" else "alice"
    serials = {who: newest_serial(probe(page)) for who, page in pages.items()}
    pages[offerer].evaluate(SWALLOW_NEXT_OFFER_JS)
    dropped = epoch_ms()
    # The answerer comes back from a drop, so the offerer rebuilds and offers.
    pages[answerer].evaluate(DROP_SOCKET_JS)
    wait_until_connected(pages[answerer], answerer, timeout_ms=RECONNECT_TIMEOUT * 1000)
    first = wait_for_audio(pages, newer_than=serials, timeout=RECONNECT_TIMEOUT)
    results["lost_offer_offerer"] = offerer
    results["lost_offer_swallowed"] = pages[offerer].evaluate("window.__swallowedOffers") == 1
    for who in pages:
        results[f"lost_offer_{who}_to_audio_ms"] = first[who]["now"] - dropped
    measure_bytes_growth(pages, results, "lost_offer_")


def bob_reloads(pages: dict[str, Page], ids: dict[str, str], results: dict) -> None:
    """Bob reloads his page: the same Bob (same peer id) comes back, and audio with him."""
    alice, bob = pages["alice"], pages["bob"]
    serials = {"alice": newest_serial(probe(alice)), "bob": 0}
    alice.evaluate(WATCH_PARTICIPANTS_JS)
    reloaded = epoch_ms()
    bob.reload()
    wait_until_connected(bob, "Bob", timeout_ms=RECONNECT_TIMEOUT * 1000)
    first = wait_for_audio(pages, newer_than=serials, timeout=RECONNECT_TIMEOUT)
    for who in pages:
        results[f"reload_{who}_to_audio_ms"] = first[who]["now"] - reloaded
    results["reload_bob_same_peer_id"] = first["bob"]["selfId"] == ids["bob"]
    check(results, "reload_alice_sees_bob", lambda: shows_connected_peer(alice, ids["bob"], "Bob"))
    check(results, "reload_bob_sees_alice", lambda: shows_connected_peer(bob, ids["alice"], "Alice"))
    check(results, "reload_alice_sees_two", lambda: expect(alice.locator("#participants li")).to_have_count(2))
    # However briefly, Alice was shown Bob reconnecting (not leaving), then back.
    changes = [c["state"] for c in alice.evaluate("window.__participantChanges") if c["peerId"] == ids["bob"]]
    results["reload_alice_bob_states"] = changes
    results["reload_alice_saw_bob_reconnect"] = "reconnecting" in changes and changes[-1] == "connected"
    # Bob was muted: his place still is, so the reloaded page mutes its microphone
    # on the welcome's word, without a mute frame of its own.
    check(
        results,
        "reload_bob_mute_kept",
        lambda: (
            expect(participant(alice, ids["bob"]).locator(".badge-muted")).to_be_visible(),
            expect(bob.locator("#mute-button")).to_have_text("Unmute"),
            expect(participant(bob, ids["bob"]).locator(".badge-muted")).to_be_visible(),
        ),
    )
    results["reload_bob_mic_off"] = bob.evaluate("window.voicebotRoom.micEnabled") is False
    results["reload_bob_mute_frames"] = [f for f in bob.evaluate("window.__voicebotSent") if f.startswith("mute")]
    results["reload_bob_sent_no_mute"] = results["reload_bob_mute_frames"] == []
    measure_bytes_growth(pages, results, "reload_")
    for who, page in pages.items():
        save_screenshot(page, f"reloaded-{who}")


def bob_opens_second_tab(pages: dict[str, Page], base_url: str, ids: dict[str, str], results: dict) -> Page:
    """Bob opens the room in a second tab as the same session: it takes over, the
    first tab stops for good (no reconnecting back and forth), Alice keeps Bob.
    Returns the second tab; the first is closed."""
    alice, first_tab = pages["alice"], pages["bob"]
    session = first_tab.evaluate("sessionStorage.getItem('voicebot.session')")
    serials = {"alice": newest_serial(probe(alice)), "bob": 0}
    tab = first_tab.context.new_page()
    watch_http(tab, "bob-tab-2", results)
    tab.add_init_script(f"sessionStorage.setItem('voicebot.session', {json.dumps(session)})")
    opened = epoch_ms()
    tab.goto(f"{base_url}/lobby/{LOBBY}/")
    wait_until_connected(tab, "Bob's second tab")
    status = first_tab.locator("#connection-status")
    check(
        results,
        "second_tab_replaces_first",
        lambda: (
            expect(status).to_have_attribute("data-state", "disconnected"),
            expect(status).to_contain_text("another tab"),
            expect(first_tab.locator("#rejoin-button")).to_be_visible(),
        ),
    )
    pages = {"alice": alice, "bob": tab}
    first = wait_for_audio(pages, newer_than=serials, timeout=RECONNECT_TIMEOUT)
    for who in pages:
        results[f"second_tab_{who}_to_audio_ms"] = first[who]["now"] - opened
    results["second_tab_same_peer_id"] = first["bob"]["selfId"] == ids["bob"]
    check(results, "second_tab_alice_sees_bob", lambda: shows_connected_peer(alice, ids["bob"], "Bob"))
    measure_bytes_growth(pages, results, "second_tab_")
    # The replaced tab must not come back on its own, or the two tabs would take turns.
    state = first_tab.evaluate(
        "({ connection: window.voicebotRoom.connection, socket: window.voicebotRoom.socketState,"
        " attempts: window.voicebotRoom.reconnectAttempts, close: window.voicebotRoom.lastClose })"
    )
    results["second_tab_first_tab_state"] = state
    results["second_tab_first_tab_stays_out"] = (
        state["connection"] == "disconnected" and state["socket"] == "none" and state["attempts"] == 0
        and state["close"]["code"] == 4409
    )
    save_screenshot(first_tab, "replaced-bob")
    first_tab.close()
    return tab


def bob_leaves(pages: dict[str, Page], base_url: str, ids: dict[str, str], results: dict) -> None:
    """Leave is on purpose: Alice sees Bob go at once, not after the resume grace period."""
    alice, bob = pages["alice"], pages["bob"]
    left = time.monotonic()
    bob.get_by_role("button", name="Leave").click()
    bob.wait_for_url(f"{base_url}/")
    check(
        results,
        "leave_alice_sees_bob_gone",
        lambda: expect(participant(alice, ids["bob"])).to_have_count(0, timeout=LEAVE_TIMEOUT_MS),
    )
    results["leave_seen_ms"] = round((time.monotonic() - left) * 1000)


def mute_frames_sent(page: Page, since: int = 0) -> list[str]:
    return [frame for frame in page.evaluate("window.__voicebotSent")[since:] if frame.startswith("mute")]


def password_lobby(pages: dict[str, Page], base_url: str, results: dict) -> dict[str, Page]:
    """Alice creates a lobby with a password and lands in it; Bob is asked for
    the password, gives a wrong one, then the right one; they hear each other."""
    alice, bob = pages["alice"], pages["bob"]
    alice.get_by_role("button", name="Leave").click()
    alice.wait_for_url(f"{base_url}/")
    alice.fill("#create-name", SECRET_LOBBY)
    alice.fill("#create-password", SECRET_PASSWORD)
    alice.get_by_role("button", name="Create and join").click()
    alice.wait_for_url(f"{base_url}/lobby/{SECRET_LOBBY}/")
    wait_until_connected(alice, "Alice in the password lobby")
    results["secret_alice_not_asked"] = alice.locator("#password-step").is_hidden()

    # Bob is on the landing page since he left: the list marks the lobby as locked.
    check(
        results,
        "secret_lock_shown",
        lambda: (
            expect(bob.locator("#lobby-list li", has_text=SECRET_LOBBY).locator(".badge-password")).to_be_visible(),
            expect(bob.locator("#lobby-list li", has_text=LOBBY).locator(".badge-password")).to_be_hidden(),
        ),
    )
    save_screenshot(bob, "landing-lock-bob")

    bob.goto(f"{base_url}/lobby/{SECRET_LOBBY}/")
    prompt, note = bob.locator("#password-step"), bob.locator("#password-message")
    check(
        results,
        "secret_bob_asked",
        lambda: (
            expect(prompt).to_be_visible(),
            expect(note).to_be_hidden(),
            expect(bob.locator("#room-ui")).to_be_hidden(),
        ),
    )
    bob.fill("#password-input", WRONG_PASSWORD)
    bob.locator("#password-form").get_by_role("button", name="Join").click()
    check(
        results,
        "secret_bob_asked_again",
        lambda: (
            expect(note).to_contain_text("wrong"),
            expect(prompt).to_be_visible(),
            expect(bob.locator("#password-input")).to_have_value(""),
        ),
    )
    results["secret_wrong_password_forgotten"] = (
        bob.evaluate(f"sessionStorage.getItem('voicebot.password.{SECRET_LOBBY}')") is None
    )
    save_screenshot(bob, "password-wrong-bob")
    bob.fill("#password-input", SECRET_PASSWORD)
    bob.locator("#password-form").get_by_role("button", name="Join").click()
    wait_until_connected(bob, "Bob in the password lobby")
    results["secret_password_kept"] = (
        bob.evaluate(f"sessionStorage.getItem('voicebot.password.{SECRET_LOBBY}')") == SECRET_PASSWORD
    )
    first = wait_for_audio(pages)
    ids = {who: first[who]["selfId"] for who in pages}
    check(results, "secret_alice_sees_bob", lambda: shows_connected_peer(alice, ids["bob"], "Bob"))
    check(results, "secret_bob_sees_alice", lambda: shows_connected_peer(bob, ids["alice"], "Alice"))
    measure_bytes_growth(pages, results, "secret_")
    for who, page in pages.items():
        save_screenshot(page, f"secret-{who}")
    return ids


def admin_mute_and_quick_toggle(pages: dict[str, Page], ids: dict[str, str], results: dict) -> None:
    """An administrator's mute (played into Bob's socket) mutes Bob's page with
    no mute frame back; a quick mute-unmute does not flicker on its echoes."""
    alice, bob = pages["alice"], pages["bob"]
    bob_self = participant(bob, ids["bob"])
    sent = len(bob.evaluate("window.__voicebotSent"))
    admin_mute = {
        "type": "peer_updated",
        "peer": {"peer_id": ids["bob"], "name": "Bob", "bot": False, "muted": True, "state": "connected"},
    }
    bob.evaluate(INJECT_FRAME_JS, admin_mute)
    check(
        results,
        "admin_mute_shown",
        lambda: (
            expect(bob.locator("#mute-button")).to_have_text("Unmute"),
            expect(bob.locator("#mute-button")).to_have_attribute("aria-pressed", "true"),
            expect(bob.locator("#room-notice")).to_contain_text("An administrator muted you"),
            expect(bob_self.locator(".badge-muted")).to_be_visible(),
        ),
    )
    results["admin_mute_mic_off"] = bob.evaluate("window.voicebotRoom.micEnabled") is False
    results["admin_mute_frames_sent"] = mute_frames_sent(bob, sent)
    results["admin_mute_not_answered"] = results["admin_mute_frames_sent"] == []
    save_screenshot(bob, "admin-muted-bob")
    # Bob may unmute again.
    bob.get_by_role("button", name="Unmute").click()
    results["admin_mute_unmuted_mic_on"] = bob.evaluate("window.voicebotRoom.micEnabled") is True

    # Mute and unmute in one go: both frames are out before either echo is back.
    bob.evaluate(
        """() => {
          const seen = [];
          window.__selfMuted = seen;
          const item = document.querySelector('#participants li.self');
          // Each record's old value is what was shown before it; the last is shown now.
          new MutationObserver((records) => seen.push(...records.map((record) => record.oldValue)))
            .observe(item, { attributes: true, attributeFilter: ['data-muted'], attributeOldValue: true });
          const button = document.getElementById('mute-button');
          button.click();
          button.click();
        }"""
    )
    # Polled from here: wait_for_function evaluates with eval(), which the
    # page's content security policy refuses.
    deadline = time.monotonic() + STEP_TIMEOUT_MS / 1000
    while bob.evaluate("window.voicebotRoom.muteEchoesPending") != 0 and time.monotonic() < deadline:
        bob.wait_for_timeout(50)
    results["quick_toggle_echoes_back"] = bob.evaluate("window.voicebotRoom.muteEchoesPending") == 0
    seen = bob.evaluate("[...window.__selfMuted, document.querySelector('#participants li.self').dataset.muted]")
    shown = [value for i, value in enumerate(seen) if i == 0 or seen[i - 1] != value]
    results["quick_toggle_self_shown"] = shown
    # Unmuted, muted by the first click, unmuted by the second; the echoes change nothing.
    results["quick_toggle_no_flicker"] = shown == ["false", "true", "false"]
    check(
        results,
        "quick_toggle_ends_unmuted",
        lambda: (
            expect(bob.locator("#mute-button")).to_have_text("Mute"),
            expect(bob_self.locator(".badge-muted")).to_be_hidden(),
            expect(participant(alice, ids["bob"]).locator(".badge-muted")).to_be_hidden(),
        ),
    )
    results["quick_toggle_mic_on"] = bob.evaluate("window.voicebotRoom.micEnabled") is True


# Ends the page's socket as the server would after an error, without the real socket closing.
FINAL_CLOSE_JS = """
([error, code]) => {
  const socket = window.__voicebotSockets.at(-1);
  socket.dispatchEvent(new MessageEvent('message', { data: JSON.stringify(error) }));
  socket.dispatchEvent(new CloseEvent('close', { code, reason: '' }));
}
"""


def final_closes(pages: dict[str, Page], results: dict) -> None:
    """A kick and a closed lobby (played in) stop the pages for good, with the right words."""
    cases = {
        "bob": (
            {"type": "error", "code": "kicked",
             "message": "An administrator removed you from this lobby; you may join it again in 5 min."},
            4008,
            "you may join it again in 5 min",
        ),
        "alice": (
            {"type": "error", "code": "lobby_closed", "message": "An administrator closed this lobby."},
            4410,
            "An administrator closed this lobby.",
        ),
    }
    for who, (error, code, words) in cases.items():
        page = pages[who]
        page.evaluate(FINAL_CLOSE_JS, [error, code])
        status = page.locator("#connection-status")
        check(
            results,
            f"final_close_{code}_shown",
            lambda page=page, status=status, words=words: (
                expect(status).to_have_attribute("data-state", "disconnected"),
                expect(status).to_contain_text(words),
                expect(page.locator("#rejoin-button")).to_be_visible(),
            ),
        )
        state = page.evaluate(
            "({ connection: window.voicebotRoom.connection, attempts: window.voicebotRoom.reconnectAttempts })"
        )
        results[f"final_close_{code}_stays_out"] = state == {"connection": "disconnected", "attempts": 0}
        save_screenshot(page, f"closed-{code}-{who}")


def run_browser(server: Server, results: dict) -> None:
    base_url = server.base_url
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            pages = {}
            for who in ("alice", "bob"):
                context = browser.new_context(viewport={"width": 1100, "height": 760})
                context.set_default_timeout(STEP_TIMEOUT_MS)
                context.set_default_navigation_timeout(STEP_TIMEOUT_MS)
                context.add_init_script(SOCKET_SPY_JS)
                pages[who] = context.new_page()
                watch_http(pages[who], who, results)
            expect.set_options(timeout=STEP_TIMEOUT_MS)
            alice, bob = pages["alice"], pages["bob"]

            opened = {
                "alice": alice_creates_lobby(alice, base_url, results),
                "bob": bob_joins_from_list(bob, base_url),
            }
            first = wait_for_audio(pages)
            room_opened = {who: page.evaluate("performance.timeOrigin") for who, page in pages.items()}
            for who in pages:
                results[f"{who}_open_to_audio_ms"] = round(first[who]["now"] - opened[who])
                results[f"{who}_room_to_audio_ms"] = round(first[who]["now"] - room_opened[who])
            # Alice's wait includes Bob's whole walk from the landing page into the room.
            results["alice_audio_after_bob_open_ms"] = round(first["alice"]["now"] - opened["bob"])

            before = {who: probe(page) for who, page in pages.items()}
            time.sleep(BYTES_GROWTH_WINDOW)
            after = {who: probe(page) for who, page in pages.items()}
            for who in pages:
                results[f"{who}_bytes_before"] = received_bytes(before[who])
                results[f"{who}_bytes_after"] = received_bytes(after[who])
                results[f"{who}_peer_states"] = [peer["state"] for peer in after[who]["peers"]]
                results[f"{who}_candidate_addresses"] = used_candidate_addresses(after[who])
                results[f"{who}_candidate_pairs"] = [pair for peer in after[who]["peers"] for pair in peer["pairs"]]
            alice_id, bob_id = after["alice"]["selfId"], after["bob"]["selfId"]

            check(results, "alice_sees_bob", lambda: expect(participant(alice, bob_id)).to_contain_text("Bob"))
            check(results, "bob_sees_alice", lambda: expect(participant(bob, alice_id)).to_contain_text("Alice"))

            alice.fill("#chat-input", CHAT_TEXT)
            alice.press("#chat-input", "Enter")
            check(results, "chat_seen_by_bob", lambda: expect(bob.locator("#chat-log")).to_contain_text(CHAT_TEXT))
            check(results, "chat_escaped", lambda: expect(bob.locator("#chat-log b")).to_have_count(0))

            bob.get_by_role("button", name="Mute").click()
            check(
                results,
                "bob_muted_seen_by_alice",
                lambda: expect(participant(alice, bob_id).locator(".badge-muted")).to_be_visible(),
            )

            # An undeliverable message is only noted: the room stays as it was.
            bob.evaluate(INJECT_FRAME_JS, DELIVERY_FAILED)
            check(
                results,
                "delivery_failed_noted",
                lambda: expect(bob.locator("#room-notice")).to_contain_text("couldn't be delivered"),
            )
            check(
                results,
                "delivery_failed_keeps_room",
                lambda: (
                    expect(bob.locator("#connection-status")).to_have_attribute("data-state", "connected"),
                    expect(participant(bob, alice_id)).to_have_attribute("data-connection", "connected"),
                ),
            )

            favicon = alice.locator('link[rel="icon"]').get_attribute("href") or ""
            favicon_response = alice.request.get(f"{base_url}{favicon}")
            results["favicon"] = f"{favicon_response.status} {favicon_response.headers.get('content-type')}"

            for who, page in pages.items():
                save_screenshot(page, f"room-{who}")

            ids = {"alice": alice_id, "bob": bob_id}
            server_restart(pages, server, ids, results)
            bob_drops(pages, ids, results)
            offer_lost(pages, ids, results)
            bob_reloads(pages, ids, results)
            pages["bob"] = bob_opens_second_tab(pages, base_url, ids, results)
            bob_leaves(pages, base_url, ids, results)
            secret_ids = password_lobby(pages, base_url, results)
            admin_mute_and_quick_toggle(pages, secret_ids, results)
            final_closes(pages, results)
        finally:
            browser.close()


def evaluate(results: dict) -> list[str]:
    """The checks that failed, by name."""
    failures = [name for name, value in results.items() if value is False and name != "ok"]
    if results.get("http_errors"):
        failures.append("no_http_errors")
    posts = results.get("posts", [])
    if not posts or any(post["content_type"] != "application/json" or not post["body"] for post in posts):
        failures.append("posts_are_json")
    if not results.get("favicon", "").startswith("200 image/svg+xml"):
        failures.append("favicon_served")
    if not all(str(results.get(key, "")).isdigit() for key in ("create_max_value", "create_max_limit")):
        failures.append("create_max_from_server")
    for who in ("alice", "bob"):
        for prefix in ("", "restart_", "drop_", "lost_offer_", "reload_", "second_tab_", "secret_"):
            if not results.get(f"{prefix}{who}_bytes_after", 0) > results.get(f"{prefix}{who}_bytes_before", 0):
                failures.append(f"{prefix}{who}_audio_bytes_growing")
            if results.get(f"{prefix}{who}_peer_states") != ["connected"]:
                failures.append(f"{prefix}{who}_one_connected_peer")
        addresses = results.get(f"{who}_candidate_addresses", [])
        if not addresses or any(address != "127.0.0.1" for address in addresses):
            failures.append(f"{who}_loopback_candidates_only")
    return failures


def main() -> int:
    results: dict = {"ok": False}
    server = None
    data_dir = tempfile.mkdtemp(prefix="voicebot-e2e-")
    log_path = Path(data_dir) / "daphne.log"
    try:
        with open(log_path, "w") as log_file:
            server = Server(data_dir, free_port(), log_file)
            server.start()
            run_browser(server, results)
        failures = evaluate(results)
        results["ok"] = not failures
        if failures:
            results["error"] = "failed checks: " + ", ".join(failures)
    except (ScenarioFailure, PlaywrightError, subprocess.TimeoutExpired) as error:
        results["error"] = f"{type(error).__name__}: {error}"
    finally:
        if server is not None:
            server.stop()
        if not results["ok"] and log_path.exists():
            sys.stderr.write("--- daphne log (last 4000 characters) ---\n")
            sys.stderr.write(log_path.read_text()[-4000:] + "\n")
        shutil.rmtree(data_dir, ignore_errors=True)
    if not results["ok"]:
        sys.stderr.write(f"browser room scenario FAILED: {results['error']}\n")
    print(json.dumps(results), flush=True)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
