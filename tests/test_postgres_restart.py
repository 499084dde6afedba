"""Postgres restarted under a running server: requests during the outage get
clean 503s, connected peers keep relaying, and afterwards the same process
serves again with every session and lobby still there.

The test stops and starts a Postgres cluster of its own, never the shared one.
"""

import asyncio
import glob
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import websockets

from tests.conftest import PROJECT_DIR, LiveClient, LiveServer, free_port, http_json, production_env
from tests.monitoring.conftest import get_json, wait_for_status

# Short, so the outage's requests answer quickly; the default is 10 s.
POOL_TIMEOUT_SECONDS = 2
# Longer than a restart takes, and than the pool's first few reconnect pauses.
# (Without the pool's reconnect_timeout, a 90 s outage took 15 s to heal.)
OUTAGE_SECONDS = 20
# Postgres is back: the same process serves again within this long.
RECOVERY_SECONDS = 5


class PrivatePostgres:
    """A Postgres cluster of the test's own, on a free loopback port, which it may stop and start again."""

    def __init__(self) -> None:
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        assert binaries, "no PostgreSQL server binaries under /usr/lib/postgresql"
        self.bin = Path(binaries[-1])
        self.root = Path(tempfile.mkdtemp(prefix="voicebot-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        # initdb refuses to run as root; the cluster belongs to the postgres user.
        shutil.chown(self.root, "postgres")
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def run(self, program: str, *args: str) -> None:
        command = ["runuser", "-u", "postgres", "--", str(self.bin / program), *args]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-o", options, "-w", "start")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        # Whatever state the test left it in.
        command = ["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.data)]
        subprocess.run([*command, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A migrated database (`voicebot`) in a private cluster, removed afterwards."""
    postgres = PrivatePostgres()
    try:
        postgres.start()
        postgres.run("createdb", "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "postgres", "voicebot")
        # Migrated as deploying.md says, before any server process starts.
        env = {**production_env(), "DATABASE_URL": postgres.url("voicebot")}
        env.pop("DATABASE_REPLICA_URL", None)
        migrate = [sys.executable, "manage.py", "migrate", "--noinput", "-v0"]
        subprocess.run(migrate, cwd=PROJECT_DIR, env=env, check=True, timeout=120)
        yield postgres
    finally:
        postgres.remove()


def request(url: str, method: str = "GET", body: dict | None = None, headers: dict[str, str] | None = None):
    """Status, headers and body text, for error statuses too; time out rather than hang."""
    data = json.dumps(body).encode() if body is not None else None
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        http_request = urllib.request.Request(url, data, all_headers, method=method)
        with urllib.request.urlopen(http_request, timeout=15) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def assert_clean_503(started: float, status: int, headers, body: str, kind: str) -> None:
    assert status == 503, body[:2000]
    # Bounded by the pool's timeout, not a hang.
    assert time.monotonic() - started < POOL_TIMEOUT_SECONDS + 3
    assert int(headers["Retry-After"]) > 0
    assert "Traceback" not in body and "OperationalError" not in body and "127.0.0.1" not in body
    if kind == "json":
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body)["code"] == "database_unavailable"
    else:
        assert headers["Content-Type"].startswith("text/html")
        assert "temporarily unavailable" in body


async def refused_join(server: LiveServer, token: str) -> tuple[dict, int]:
    """The error frame and close code a join gets."""
    async with websockets.connect(f"{server.ws}/ws/lobby/standup/?token={token}", open_timeout=10) as socket:
        frame = json.loads(await asyncio.wait_for(socket.recv(), 15))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(socket.recv(), 15)
        return frame, socket.close_code


async def test_postgres_restart_under_a_running_server(
    private_postgres: PrivatePostgres, start_production_server: Callable[..., LiveServer]
) -> None:
    server = start_production_server(
        DATABASE_URL=private_postgres.url("voicebot"), DATABASE_POOL_TIMEOUT=str(POOL_TIMEOUT_SECONDS)
    )
    alice, bob = LiveClient(server, "Alice"), LiveClient(server, "Bob")
    carol = http_json(f"{server.http}/api/sessions/", {"name": "Carol"})
    http_json(f"{server.http}/api/lobbies/", {"name": "standup"}, token=alice.token)
    http_json(f"{server.http}/api/lobbies/", {"name": "retro", "private": True}, token=bob.token)
    await alice.join("standup")
    await bob.join("standup")
    assert (await alice.receive())["type"] == "peer_joined"
    await alice.send({"type": "chat", "text": "before the restart"})
    assert (await bob.receive())["text"] == "before the restart"
    assert (await alice.receive())["text"] == "before the restart"

    private_postgres.stop()
    stopped = time.monotonic()

    # A bearer token, and a Django session cookie for the admin to look up.
    outage_headers = {"Authorization": f"Bearer {carol['token']}", "Cookie": f"sessionid={'s' * 32}"}
    for method, path, body, kind in [
        ("POST", "/api/sessions/", {"name": "Dave"}, "json"),
        ("GET", "/api/lobbies/", None, "json"),
        ("GET", "/api/lobbies/standup/", None, "json"),
        ("POST", "/api/lobbies/", {"name": "outage"}, "json"),
        ("GET", "/admin/", None, "html"),
    ]:
        started = time.monotonic()
        status, headers, text = request(f"{server.http}{path}", method, body, outage_headers)
        assert_clean_503(started, status, headers, text, kind)
    # Pages that read nothing from the database still load.
    assert request(f"{server.http}/")[0] == 200
    assert request(f"{server.http}/lobby/standup/")[0] == 200

    status, body = get_json(f"{server.http}/readyz")
    assert status == 503 and "database:default" in body["failing"], body
    # Liveness checks no dependency: the process is taken out of rotation, not killed.
    assert get_json(f"{server.http}/healthz") == (200, {"status": "ok"})

    # Joins: Carol's identity is still in the process's cache, a stranger's token is not.
    for token in (carol["token"], "a-token-no-one-was-given"):
        frame, code = await refused_join(server, token)
        assert (frame["type"], frame["code"], code) == ("error", "unavailable", 4503)
    # Signaling goes peer to peer through the channel layer, not the database.
    await alice.send({"type": "offer", "to": bob.id, "sdp": "v=0 during the outage"})
    relayed = await bob.receive()
    assert (relayed["type"], relayed["from"], relayed["sdp"]) == ("offer", alice.id, "v=0 during the outage")
    # Chat is stored first, so it fails, and says so; so does a mute.
    await alice.send({"type": "chat", "text": "lost"})
    assert (await alice.receive())["code"] == "chat_failed"
    await bob.send({"type": "mute", "muted": True})
    assert (await bob.receive())["code"] == "unavailable"

    await asyncio.sleep(OUTAGE_SECONDS - (time.monotonic() - stopped))
    private_postgres.start()
    restarted = time.monotonic()
    bearer = {"Authorization": f"Bearer {bob.token}"}
    while (status := request(f"{server.http}/api/lobbies/", headers=bearer)[0]) != 200:
        assert status == 503 and time.monotonic() - restarted < RECOVERY_SECONDS, status
        await asyncio.sleep(0.2)
    wait_for_status(f"{server.http}/readyz", 200, timeout=RECOVERY_SECONDS)
    assert server.process.poll() is None  # the same process, not restarted

    # Every session and lobby from before is there: tokens still work.
    for person, token in [("Alice", alice.token), ("Bob", bob.token), ("Carol", carol["token"])]:
        assert http_json(f"{server.http}/api/sessions/resume/", {}, token=token)["name"] == person
    listed = {lobby["name"] for lobby in http_json(f"{server.http}/api/lobbies/", token=bob.token)["lobbies"]}
    assert {"standup", "retro"} <= listed
    standup = http_json(f"{server.http}/api/lobbies/standup/")
    assert {peer["name"] for peer in standup["participants"]} == {"Alice", "Bob"}
    assert http_json(f"{server.http}/api/sessions/", {"name": "Dave"})["name"] == "Dave"

    # The connected peers were never dropped, and chat is stored again.
    await alice.send({"type": "chat", "text": "after the restart"})
    assert (await bob.receive())["text"] == "after the restart"
    welcome = await LiveClient(server, "Erin").join("standup")
    assert {peer["name"] for peer in welcome["peers"]} == {"Alice", "Bob"}
    await alice.close()
    await bob.close()
    # The outage is logged as warnings, not as a traceback per request or per beat.
    assert "Traceback" not in server.log.read_text()
