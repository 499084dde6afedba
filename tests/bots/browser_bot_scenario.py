"""A person talks with an AI voice bot in a real browser, over real WebRTC.

Run it inside a loopback-only network namespace (tests/bots/test_browser_bot.py
does), from any directory:

    unshare -n -- sh -c 'ip link set lo up && exec .venv/bin/python tests/bots/browser_bot_scenario.py'

It starts `manage.py runserver` on the embedded default (SQLite, in-memory
channel layer, the bot worker inside the server process) in a temporary
directory, and a fake OpenAI-compatible server in this process. Alice's page
runs in Debian's chromium, whose fake microphone plays a question spoken by
eSpeak NG. An administrator, on a second page, adds the bot Ava to Alice's
lobby with the bot list's action; Ava must show up on Alice's page as a bot
within 2 s, greet her (Alice's page receives audio with energy in it), hear the
question (the turn in the conversation history has its words), answer through
the fake provider (Alice's page receives the spoken answer, and both lines are
in the chat), and leave within 2 s of the administrator removing her.

It prints one JSON object with what it measured on its last stdout line, and
exits non-zero, with the reason on stderr and in the JSON "error", when
anything fails. On failure the server log goes to test-artifacts/ next to the
screenshots.
"""

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# Run as a script, only this file's own directory is on the path.
sys.path.insert(0, str(ROOT))

from playwright.sync_api import Error as PlaywrightError  # noqa: E402
from playwright.sync_api import Locator, Page, expect, sync_playwright  # noqa: E402

from tests.bots.fake_providers import FakeOpenAI  # noqa: E402

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
# Those of tests/lobbies/browser_room_scenario.py; the microphone file is added per run.
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

LOBBY = "bot-room"
BOT_NAME = "Ava"
GREETING = "Hello {name}, I am Ava."
GREETING_TO_ALICE = GREETING.format(name="Alice")
ANSWER = "The capital of Spain is Madrid."
QUESTION = "What is the capital of Spain?"
QUESTION_WORDS = ("capital", "spain")
ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-password-for-the-e2e-test"
# The server reads the provider's key from this variable; the fake refuses any other key.
KEY_VARIABLE, API_KEY = "FAKE_OPENAI_KEY", "sk-fake-e2e-0123456789"

# The microphone file, which Chromium loops from the page's getUserMedia on:
# silence, the question, silence. The lead is long enough for the admin's add
# and the greeting (about 3 s from Alice's arrival), so the first question
# normally comes after the greeting; should it not, the scenario listens for
# the first question that starts once the greeting is over, a loop later. One
# loop holds the bot's whole answer, so the next question does not cut it short.
LEAD_SILENCE_SECONDS = 6.0
TAIL_SILENCE_SECONDS = 7.0
MIC_RATE = 48000

SERVER_START_TIMEOUT = 30
# The worker loads Whisper and the VAD before it registers.
WORKER_START_TIMEOUT = 90
STEP_TIMEOUT_MS = 15_000
# The bound for an administrator's add or remove to reach the room.
ADMIN_ACTION_BOUND_MS = 2000
ADMIN_ACTION_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT = 20
GREETING_TIMEOUT = 20
QUESTION_TIMEOUT = 40  # up to a whole loop of the microphone file, and then some
TURN_TIMEOUT = 30
ANSWER_TIMEOUT = 30

# Audio energy arrives in steps of at most 100 ms (the sampler's period); a
# step this large is sound, not codec noise. Speech at a level of 0.1 adds 1e-3.
SOUND_STEP = 1e-6
# A gap in the sound this long ends a burst (a word gap is far shorter).
BURST_GAP_MS = 800

# Samples audio on every peer connection of the page every 100 ms: what it
# receives (inbound-rtp) and what its microphone gives (media-source), as
# cumulative energies, with the page's clock.
AUDIO_SAMPLER_JS = """
() => {
  if (window.__audioTimeline) return;
  const timeline = [];
  window.__audioTimeline = timeline;
  async function sample() {
    const entry = { at: Date.now(), links: [] };
    for (const { peerId, serial, pc } of window.voicebotRoom.links) {
      const stats = await pc.getStats();
      const link = { peerId, serial, state: pc.connectionState, heard: 0, level: 0, bytes: 0, spoken: 0, pairs: [] };
      stats.forEach((report) => {
        if (report.type === 'inbound-rtp' && report.kind === 'audio') {
          link.heard += report.totalAudioEnergy || 0;
          link.level = Math.max(link.level, report.audioLevel || 0);
          link.bytes += report.bytesReceived || 0;
        }
        if (report.type === 'media-source' && report.kind === 'audio') {
          link.spoken += report.totalAudioEnergy || 0;
        }
        if (report.type === 'candidate-pair' && (report.state === 'succeeded' || report.nominated)) {
          const local = stats.get(report.localCandidateId) || {};
          const remote = stats.get(report.remoteCandidateId) || {};
          link.pairs.push([local.address || local.ip || null, remote.address || remote.ip || null]);
        }
      });
      entry.links.push(link);
    }
    timeline.push(entry);
  }
  // One sample after the other, so a slow getStats never overlaps the next.
  async function tick() {
    try {
      await sample();
    } finally {
      setTimeout(tick, 100);
    }
  }
  tick();
}
"""

# Records, with the page's clock, every participant entry added to or removed
# from the list, and whether it shows the bot badge.
WATCH_PARTICIPANTS_JS = """
() => {
  const changes = [];
  window.__participantLog = changes;
  const describe = (item, change) => ({
    change,
    at: Date.now(),
    peerId: item.dataset.peerId,
    name: item.querySelector('.participant-name').textContent,
    botBadge: !item.querySelector('.badge-bot').hidden,
  });
  new MutationObserver((records) => {
    for (const record of records) {
      if (record.type === 'childList') {
        record.addedNodes.forEach((item) => item.dataset && changes.push(describe(item, 'added')));
        record.removedNodes.forEach((item) => item.dataset && changes.push(describe(item, 'removed')));
      } else {
        // A name or badge filled in just after the entry was added.
        const item = record.target.closest('li');
        if (item) changes.push(describe(item, 'changed'));
      }
    }
  }).observe(document.getElementById('participants'), {
    childList: true, subtree: true, characterData: true, attributes: true, attributeFilter: ['hidden'],
  });
}
"""


class ScenarioFailure(Exception):
    pass


@dataclass
class Burst:
    """A stretch of sound in one cumulative energy series, in the page's epoch ms."""

    start: int  # the last quiet sample before it
    end: int  # the last sample that grew
    energy: float


# --- Processes -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(data_dir: str) -> dict[str, str]:
    """The embedded default (no database or Redis), with the bot worker in the server."""
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        VOICEBOT_DATA_DIR=data_dir,
        DJANGO_SETTINGS_MODULE="voicebot.settings",
        PYTHONUNBUFFERED="1",
        # aioice skips loopback addresses, which leaves the bot no ICE candidate
        # at all in a loopback-only namespace.
        BOT_HOST_ADDRESSES="127.0.0.1",
        DJANGO_SUPERUSER_USERNAME=ADMIN_USER,
        DJANGO_SUPERUSER_PASSWORD=ADMIN_PASSWORD,
        DJANGO_SUPERUSER_EMAIL="admin@example.com",
    )
    env[KEY_VARIABLE] = API_KEY
    return env


def manage(env: dict[str, str], *arguments: str) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise ScenarioFailure(f"manage.py {arguments[0]} failed:\n{done.stdout}\n{done.stderr}")


def start_server(env: dict[str, str], port: int, log_file) -> subprocess.Popen:
    """The README's development command; the first request starts the bot worker in it."""
    return subprocess.Popen(
        [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
        cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
    )


def wait_for_server(server: subprocess.Popen, base_url: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ScenarioFailure(f"runserver exited with code {server.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise ScenarioFailure(f"runserver did not answer {base_url}/healthz within {SERVER_START_TIMEOUT} s")


def stop_server(server: subprocess.Popen | None) -> None:
    if server is None or server.poll() is not None:
        return
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)


def setup_django(env: dict[str, str]) -> None:
    """This process reads and writes the server's SQLite database through the ORM."""
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    os.environ.update(VOICEBOT_DATA_DIR=env["VOICEBOT_DATA_DIR"], DJANGO_SETTINGS_MODULE="voicebot.settings")
    # Playwright's sync API keeps an event loop running in this thread, which
    # makes Django refuse its (sync) ORM; the reads here are plain sequential ones.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    import django

    django.setup()


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise ScenarioFailure(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def epoch_ms() -> int:
    """The same clock as the pages' Date.now(): all run on this machine."""
    return round(time.time() * 1000)


# --- Preparation ---------------------------------------------------------------


def write_question_wav(path: Path) -> float:
    """The microphone file: the question spoken by the bots' own eSpeak NG
    synthesizer, between silences. Returns the question's length in seconds."""
    import numpy as np

    from bots.speech import Synthesizer

    speech = asyncio.run(Synthesizer("en-us").synthesize(QUESTION))
    silence = lambda seconds: np.zeros(int(seconds * MIC_RATE), dtype=np.int16)  # noqa: E731
    pcm = np.concatenate([silence(LEAD_SILENCE_SECONDS), speech, silence(TAIL_SILENCE_SECONDS)])
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(MIC_RATE)
        wav.writeframes(pcm.astype("<i2").tobytes())
    return len(speech) / MIC_RATE


def create_bot(fake: FakeOpenAI) -> int:
    """The provider (the fake, its key read from the server's environment) and the bot."""
    from bots.models import Bot, Provider

    provider = Provider.objects.create(
        name="Fake OpenAI", kind=Provider.Kind.OPENAI, base_url=fake.base_url, api_key_env=KEY_VARIABLE,
        timeout_seconds=10,
    )
    bot = Bot.objects.create(
        name=BOT_NAME, provider=provider, model_name="fake-model", greeting=GREETING,
        system_prompt="You are Ava, a helpful voice assistant. Answer in one short sentence.",
    )
    return bot.pk


def wait_for_worker() -> None:
    from bots.models import Worker

    wait_until(
        lambda: Worker.objects.filter(stopped_at__isnull=True).exists(),
        WORKER_START_TIMEOUT, "the bot worker in the server to start (it loads its speech models first)", 0.5,
    )


# --- Pages ---------------------------------------------------------------------


def save_screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        page.screenshot(path=str(ARTIFACTS / f"browser-bot-{name}.png"), full_page=True)
    except PlaywrightError:
        pass  # a page that is gone has nothing to show


def watch_page(page: Page, who: str, results: dict) -> None:
    """Record HTTP error answers and the page's console warnings, for the report."""
    errors = results.setdefault("http_errors", [])
    console = results.setdefault("console", [])
    page.on("response", lambda r: r.status >= 400 and errors.append(f"{who}: {r.status} {r.request.method} {r.url}"))
    page.on("console", lambda m: m.type in ("warning", "error") and console.append(f"{who}: {m.text}"[:300]))


def alice_creates_lobby(page: Page, base_url: str) -> None:
    page.goto(f"{base_url}/")
    page.fill("#display-name", "Alice")
    page.fill("#create-name", LOBBY)
    page.get_by_role("button", name="Create and join").click()
    page.wait_for_url(f"{base_url}/lobby/{LOBBY}/")
    try:
        expect(page.locator("#connection-status")).to_have_attribute("data-state", "connected")
    except AssertionError:
        raise ScenarioFailure(f"Alice did not connect; status: {page.locator('#connection-status').text_content()!r}")


def admin_logs_in(page: Page, base_url: str) -> None:
    page.goto(f"{base_url}/admin/login/?next=/admin/")
    page.fill("#id_username", ADMIN_USER)
    page.fill("#id_password", ADMIN_PASSWORD)
    page.locator("input[type=submit]").click()
    page.wait_for_url(f"{base_url}/admin/")


def choose_admin_action(page: Page, changelist_url: str, object_id: int, action: str) -> Locator:
    """Tick one row of a changelist and choose the action; returns the Go button."""
    page.goto(changelist_url)
    page.check(f'input.action-select[value="{object_id}"]')
    page.select_option("select[name=action]", action)
    return page.locator("button[name=index]")


def bot_entries(page: Page) -> list[dict]:
    """Alice's page's idea of the bot: its participant entries named Ava."""
    return [peer for peer in page.evaluate("window.voicebotRoom.participants") if peer["name"] == BOT_NAME]


def participant_log(page: Page) -> list[dict]:
    return page.evaluate("window.__participantLog")


def admin_adds_bot(admin: Page, alice: Page, base_url: str, bot_id: int, results: dict) -> tuple[str, int]:
    """The bot list's action, through its intermediate page. Returns the bot's
    peer id and when Alice's page showed it (epoch ms)."""
    choose_admin_action(admin, f"{base_url}/admin/bots/bot/", bot_id, "add_to_lobby").click()
    expect(admin.locator("select#id_lobby")).to_be_visible()
    admin.select_option("select#id_lobby", label=LOBBY)
    save_screenshot(admin, "admin-add-to-lobby")
    submitted = epoch_ms()
    admin.locator("input[type=submit][value='Add to lobby']").click()
    # Polled from here: wait_for_function evaluates with eval(), which the
    # page's content security policy refuses.
    wait_until(
        lambda: alice.evaluate(
            "name => window.voicebotRoom.participants.some((peer) => peer.name === name && peer.bot)", BOT_NAME
        ),
        ADMIN_ACTION_TIMEOUT_MS / 1000,
        f"{BOT_NAME} to appear on Alice's page",
    )
    shown = [
        entry for entry in participant_log(alice)
        if entry["name"] == BOT_NAME and entry["botBadge"] and entry["change"] != "removed"
    ]
    appeared_at = shown[0]["at"] if shown else epoch_ms()
    results["bot_appeared_ms"] = appeared_at - submitted
    results["bot_shown_with_badge"] = bool(shown)
    results["bot_is_bot_peer"] = [peer["bot"] for peer in bot_entries(alice)] == [True]
    check(
        results, "admin_add_message",
        lambda: expect(admin.locator(".messagelist")).to_contain_text(f"{BOT_NAME} is joining {LOBBY}."),
    )
    return bot_entries(alice)[0]["peer_id"], appeared_at


def admin_removes_bot(admin: Page, alice: Page, base_url: str, bot_peer_id: str, results: dict) -> None:
    """The assignments list's action; Alice's page must drop the bot."""
    from bots.models import Assignment

    assignment = Assignment.objects.get(bot__name=BOT_NAME, lobby__name=LOBBY, removed_at__isnull=True)
    go = choose_admin_action(admin, f"{base_url}/admin/bots/assignment/?live=yes", assignment.pk, "remove_from_lobby")
    submitted = epoch_ms()
    go.click()
    wait_until(
        lambda: alice.evaluate(
            "peerId => !document.querySelector(`#participants li[data-peer-id=\"${peerId}\"]`)", bot_peer_id
        ),
        ADMIN_ACTION_TIMEOUT_MS / 1000,
        f"{BOT_NAME} to leave Alice's page",
    )
    gone = [entry for entry in participant_log(alice) if entry["peerId"] == bot_peer_id and entry["change"] == "removed"]
    results["bot_left_ms"] = (gone[-1]["at"] if gone else epoch_ms()) - submitted
    check(
        results, "admin_remove_message",
        lambda: expect(admin.locator(".messagelist")).to_contain_text("Removed 1 of 1 selected"),
    )
    results["bot_gone_from_participants"] = bot_entries(alice) == []
    # Alice's page closes its peer connection to a peer that left.
    results["bot_link_closed"] = bot_peer_id not in alice.evaluate("window.voicebotRoom.links.map((link) => link.peerId)")
    save_screenshot(alice, "alice-after-removal")


# --- Audio ---------------------------------------------------------------------


def timeline(page: Page) -> list[dict]:
    return page.evaluate("window.__audioTimeline")


def energy_series(samples: list[dict], peer_id: str, key: str) -> list[tuple[int, float]]:
    """One cumulative energy of the link to `peer_id`, as (epoch ms, energy).
    A rebuilt peer connection starts from zero, so only growth within one
    connection counts."""
    series: list[tuple[int, float]] = []
    total, last = 0.0, None
    for sample in samples:
        link = next((link for link in sample["links"] if link["peerId"] == peer_id), None)
        if link is None:
            continue
        if last is not None and last["serial"] == link["serial"]:
            total += max(0.0, link[key] - last[key])
        last = link
        series.append((sample["at"], total))
    return series


def bursts(series: list[tuple[int, float]]) -> list[Burst]:
    """The stretches of sound in a cumulative energy series."""
    found: list[Burst] = []
    for (before, previous), (at, value) in zip(series, series[1:]):
        if value - previous <= SOUND_STEP:
            continue
        if found and before - found[-1].end <= BURST_GAP_MS:
            found[-1].end = at
            found[-1].energy += value - previous
        else:
            found.append(Burst(start=before, end=at, energy=value - previous))
    return found


def finished_burst(page: Page, peer_id: str, key: str, after: int) -> tuple[Burst | None, list[tuple[int, float]]]:
    """The first burst starting after `after` that is over (quiet since), if any."""
    series = energy_series(timeline(page), peer_id, key)
    last_at = series[-1][0] if series else 0
    for burst in bursts(series):
        if burst.start >= after and last_at - burst.end > BURST_GAP_MS:
            return burst, series
    return None, series


def wait_for_burst(page: Page, peer_id: str, key: str, after: int, timeout: float, what: str) -> Burst:
    deadline = time.monotonic() + timeout
    while True:
        burst, series = finished_burst(page, peer_id, key, after)
        if burst is not None:
            return burst
        if time.monotonic() > deadline:
            tail = series[-1] if series else None
            raise ScenarioFailure(f"no {what} within {timeout} s (last {key} sample: {tail})")
        time.sleep(0.2)


def wait_for_link(page: Page, peer_id: str) -> int:
    """When Alice's page first sampled its peer connection to the bot connected (epoch ms)."""

    def connected() -> int | None:
        for sample in timeline(page):
            if any(link["peerId"] == peer_id and link["state"] == "connected" for link in sample["links"]):
                return sample["at"]
        return None

    return wait_until(connected, CONNECT_TIMEOUT, f"Alice's peer connection to {BOT_NAME}", 0.2)


def bot_conversation(alice: Page, bot_peer_id: str, appeared_at: int, fake: FakeOpenAI, results: dict) -> None:
    """The greeting, the question, the turn and the spoken answer."""
    results["bot_connected_ms"] = wait_for_link(alice, bot_peer_id) - appeared_at
    greeting = hear_greeting(alice, bot_peer_id, appeared_at, results)
    question = hear_question(alice, bot_peer_id, greeting, results)
    record_turn(question, results)
    answer = wait_for_burst(alice, bot_peer_id, "heard", question.start, ANSWER_TIMEOUT, "spoken answer")
    results["answer"] = asdict(answer)
    results["answer_energy"] = answer.energy
    # What Alice waits, as her page measures it: from the question's last sound to the answer's first.
    results["answer_heard_after_question_ms"] = answer.start - question.end
    record_provider_requests(fake, results)


def hear_greeting(alice: Page, bot_peer_id: str, appeared_at: int, results: dict) -> Burst:
    """The first sound from the bot once it is in the room."""
    greeting = wait_for_burst(alice, bot_peer_id, "heard", appeared_at, GREETING_TIMEOUT, "greeting audio")
    results["greeting"] = asdict(greeting)
    results["greeting_after_appearance_ms"] = greeting.start - appeared_at
    results["greeting_energy"] = greeting.energy
    results["greeting_max_level"] = max(
        (link["level"] for sample in timeline(alice) for link in sample["links"]
         if link["peerId"] == bot_peer_id and greeting.start <= sample["at"] <= greeting.end + 200),
        default=0,
    )
    return greeting


def hear_question(alice: Page, bot_peer_id: str, greeting: Burst, results: dict) -> Burst:
    """The microphone file loops: the first question that starts once the greeting is over."""
    question = wait_for_burst(
        alice, bot_peer_id, "spoken", greeting.end, QUESTION_TIMEOUT, "question from the fake microphone"
    )
    results["question"] = asdict(question)
    results["question_after_greeting_ms"] = question.start - greeting.end
    # The bot's first sound is the greeting, not an answer to an earlier playing of the question.
    spoken = bursts(energy_series(timeline(alice), bot_peer_id, "spoken"))
    results["greeting_before_any_question"] = not spoken or greeting.start < spoken[0].start
    return question


def record_turn(question: Burst, results: dict) -> None:
    """The conversation history: the voice turn of the question, and the greeting's."""
    from bots.models import Turn

    def voice_turn() -> Turn | None:
        turns = Turn.objects.filter(
            bot__name=BOT_NAME, lobby__name=LOBBY, source=Turn.Source.VOICE, created_at__gte=ms_datetime(question.start)
        ).order_by("created_at")
        return next((turn for turn in turns if mentions_question(turn.user_text)), None)

    try:
        turn = wait_until(voice_turn, TURN_TIMEOUT, f"a voice turn whose transcript has {QUESTION_WORDS}", 0.2)
    except ScenarioFailure as failure:
        recorded = Turn.objects.filter(bot__name=BOT_NAME).order_by("created_at")
        seen = [f"{t.created_at:%H:%M:%S.%f} {t.source} {t.user_text!r} -> {t.reply_text!r} {t.error}" for t in recorded]
        raise ScenarioFailure(f"{failure} (question played {question}; turns: {seen})") from None
    results["turn"] = {
        field: getattr(turn, field)
        for field in (
            "speaker_name", "user_text", "reply_text", "error", "interrupted", "end_of_speech_ms", "recognition_ms",
            "model_first_token_ms", "synthesis_first_audio_ms", "first_audio_ms",
        )
    }
    results["turn_recorded_after_question_ms"] = round(turn.created_at.timestamp() * 1000) - question.end
    greetings = Turn.objects.filter(bot__name=BOT_NAME, source=Turn.Source.GREETING)
    results["greeting_turn_text"] = [greeting.reply_text for greeting in greetings]


def record_provider_requests(fake: FakeOpenAI, results: dict) -> None:
    """What the fake provider was asked: the transcribed question, with the bot's model and key."""
    chats = [request for request in fake.requests if request.path.endswith("/chat/completions")]
    asked = [request for request in chats if mentions_question(json.dumps(request.body.get("messages", [])))]
    results["provider_requests"] = len(chats)
    results["provider_got_question"] = bool(asked)
    if asked:
        body = asked[0].body
        results["provider_model"] = body.get("model")
        results["provider_last_message"] = body["messages"][-1]
        results["provider_key_sent"] = asked[0].headers.get("authorization") == f"Bearer {API_KEY}"


def mentions_question(text: str) -> bool:
    return all(word in text.lower() for word in QUESTION_WORDS)


def ms_datetime(epoch: int):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch / 1000, tz=UTC)


def loopback_pairs(page: Page, peer_id: str) -> list[list[str]]:
    samples = timeline(page)
    links = [link for link in samples[-1]["links"] if link["peerId"] == peer_id] if samples else []
    return [pair for link in links for pair in link["pairs"]]


def check(results: dict, name: str, assertion: Callable[[], object]) -> None:
    """Record one user-visible check as a boolean instead of stopping at the first miss."""
    try:
        assertion()
        results[name] = True
    except (AssertionError, PlaywrightError) as error:
        results[name] = False
        results.setdefault("check_errors", {})[name] = str(error).splitlines()[0]


# --- The scenario ---------------------------------------------------------------


def run_browser(base_url: str, mic_file: Path, bot_id: int, fake: FakeOpenAI, results: dict) -> None:
    args = [*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={mic_file}"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args, timeout=60_000)
        pages: dict[str, Page] = {}
        try:
            for who in ("alice", "admin"):
                context = browser.new_context(viewport={"width": 1100, "height": 760})
                context.set_default_timeout(STEP_TIMEOUT_MS)
                context.set_default_navigation_timeout(STEP_TIMEOUT_MS)
                pages[who] = context.new_page()
                watch_page(pages[who], who, results)
            expect.set_options(timeout=STEP_TIMEOUT_MS)
            alice, admin = pages["alice"], pages["admin"]

            admin_logs_in(admin, base_url)
            alice_creates_lobby(alice, base_url)
            alice.evaluate(WATCH_PARTICIPANTS_JS)
            alice.evaluate(AUDIO_SAMPLER_JS)

            bot_peer_id, appeared_at = admin_adds_bot(admin, alice, base_url, bot_id, results)
            check(
                results, "bot_badge_visible",
                lambda: expect(alice.locator(f'#participants li[data-peer-id="{bot_peer_id}"] .badge-bot')).to_be_visible(),
            )
            save_screenshot(alice, "alice-with-bot")

            bot_conversation(alice, bot_peer_id, appeared_at, fake, results)
            results["candidate_pairs"] = loopback_pairs(alice, bot_peer_id)
            chat = alice.locator("#chat-log")
            check(results, "greeting_in_chat", lambda: expect(chat).to_contain_text(GREETING_TO_ALICE))
            check(results, "answer_in_chat", lambda: expect(chat).to_contain_text(ANSWER))
            save_screenshot(alice, "alice-conversation")

            admin_removes_bot(admin, alice, base_url, bot_peer_id, results)
        finally:
            for who, page in pages.items():
                save_screenshot(page, f"{who}-last")
            browser.close()


def evaluate(results: dict) -> list[str]:
    """The checks that failed, by name."""
    failures = [name for name, value in results.items() if value is False and name != "ok"]
    for key in ("bot_appeared_ms", "bot_left_ms"):
        if not 0 <= results.get(key, -1) <= ADMIN_ACTION_BOUND_MS:
            failures.append(f"{key}_within_{ADMIN_ACTION_BOUND_MS}")
    if results.get("greeting_turn_text") != [GREETING_TO_ALICE]:
        failures.append("greeting_turn_recorded")
    turn = results.get("turn", {})
    if turn.get("reply_text") != ANSWER or turn.get("error") or turn.get("speaker_name") != "Alice":
        failures.append("turn_answered_alice")
    if turn.get("first_audio_ms") is None:
        failures.append("turn_has_first_audio_ms")
    if results.get("provider_model") != "fake-model":
        failures.append("provider_asked_with_the_bots_model")
    pairs = results.get("candidate_pairs", [])
    if not pairs or any(address != "127.0.0.1" for pair in pairs for address in pair):
        failures.append("loopback_candidates_only")
    if results.get("http_errors"):
        failures.append("no_http_errors")
    return failures


def main() -> int:
    results: dict = {"ok": False}
    server = None
    fake = None
    data_dir = tempfile.mkdtemp(prefix="voicebot-bot-e2e-")
    log_path = Path(data_dir) / "runserver.log"
    started = time.monotonic()
    try:
        env = server_env(data_dir)
        manage(env, "migrate", "--noinput")
        manage(env, "createsuperuser", "--noinput")
        setup_django(env)
        mic_file = Path(data_dir) / "question.wav"
        results["question_seconds"] = round(write_question_wav(mic_file), 2)
        fake = FakeOpenAI().start()
        fake.reply_text = ANSWER
        fake.api_key = API_KEY
        bot_id = create_bot(fake)
        with open(log_path, "w") as log_file:
            port = free_port()
            base_url = f"http://127.0.0.1:{port}"
            server = start_server(env, port, log_file)
            wait_for_server(server, base_url)
            wait_for_worker()
            results["server_ready_s"] = round(time.monotonic() - started, 1)
            run_browser(base_url, mic_file, bot_id, fake, results)
        failures = evaluate(results)
        results["ok"] = not failures
        if failures:
            results["error"] = "failed checks: " + ", ".join(failures)
    except (ScenarioFailure, PlaywrightError, AssertionError, subprocess.TimeoutExpired) as error:
        results["error"] = f"{type(error).__name__}: {error}"
    finally:
        stop_server(server)
        if fake is not None:
            fake.stop()
        results["duration_s"] = round(time.monotonic() - started, 1)
        if not results["ok"] and log_path.exists():
            log = log_path.read_text()
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "browser-bot-runserver.log").write_text(log)
            sys.stderr.write("--- runserver log (last 6000 characters) ---\n" + log[-6000:] + "\n")
            results["error"] = f"{results.get('error')}\n--- runserver log tail ---\n{log[-2500:]}"
        shutil.rmtree(data_dir, ignore_errors=True)
    if not results["ok"]:
        sys.stderr.write(f"browser bot scenario FAILED: {results['error']}\n")
    print(json.dumps(results, default=str), flush=True)
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
