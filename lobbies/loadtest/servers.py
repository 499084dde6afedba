"""Server processes the load test starts, or is pointed at, and what they use.

CPU time and resident memory are read from /proc, so they are known only for
processes on this machine whose pids the suite knows (those it started, or
given with --server-pid).
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from voicebot.server import uvicorn_command

PROJECT_DIR = Path(settings.BASE_DIR)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Target:
    """What one measurement drives: the base URLs of one or more processes of one server."""

    name: str
    urls: list[str]
    pids: list[int] = field(default_factory=list)
    # The reference relay has no sessions or lobby API.
    reference: bool = False
    # Whether clients offer permessage-deflate.
    compression: bool = False
    # Whether each lobby's clients all use one process (as behind a proxy that
    # routes by lobby), rather than neighbours using different ones.
    by_lobby: bool = False
    processes: list[subprocess.Popen] = field(default_factory=list)

    def ws_url(self, index: int, lobby: str, token: str) -> str:
        if self.by_lobby:
            index = zlib.crc32(lobby.encode())
        base = self.urls[index % len(self.urls)].replace("http://", "ws://").replace("https://", "wss://")
        return f"{base}/ws/lobby/{lobby}/" + (f"?token={token}" if token else "")

    def http_url(self, index: int) -> str:
        return self.urls[index % len(self.urls)]

    def cpu_seconds(self) -> float | None:
        total = 0.0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return None
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return total if self.pids else None

    def rss_bytes(self) -> int | None:
        total = 0
        for pid in self.pids:
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
            except OSError:
                return None
        return total if self.pids else None

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def server_env() -> dict[str, str]:
    """The environment of the servers the load test and the soak run start."""
    env = dict(os.environ)
    env.setdefault("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")
    # Every client comes from this one address, and sends far faster than
    # a person: the per-address and per-connection limits would refuse them.
    env["RATE_LIMITS"] = "0"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(server: str, port: int, application: str) -> list[str]:
    if server == "uvicorn":
        return uvicorn_command(port, application)
    return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), application]


def wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError as error:
            # The reference relay serves no HTTP: any answer means it listens.
            if getattr(error, "code", None):
                return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def start(
    name: str,
    application: str,
    processes: int,
    env: dict[str, str],
    log_dir: Path,
    cpus: set[int] | None,
    reference: bool = False,
    server: str = "uvicorn",
) -> Target:
    """Start `processes` server processes of `application`, each on its own port."""
    target = Target(name=name, urls=[], reference=reference)
    for number in range(processes):
        port = free_port()
        log = log_dir / f"{name}-{number}.log"
        process = subprocess.Popen(
            server_command(server, port, application),
            cwd=PROJECT_DIR,
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            # On a machine with cores to spare, keep servers off the load generator's core.
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        target.processes.append(process)
        target.pids.append(process.pid)
        target.urls.append(f"http://127.0.0.1:{port}")
        try:
            wait_until_up(f"http://127.0.0.1:{port}/" + ("" if reference else "healthz"), process, log)
        except Exception:
            target.stop()
            raise
    return target
