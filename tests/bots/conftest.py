"""Fixtures for the bots: fake AI providers, bot profiles that use them, and
runbots worker processes."""

import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.db import connections
from django.test import Client

from bots.config import ANTHROPIC, OFFLINE, OPENAI, BotProfile, ProviderSettings
from bots.models import Worker
from tests.bots.fake_providers import FakeAnthropic, FakeOpenAI
from tests.conftest import PROJECT_DIR, LiveServer, production_env

FAKE_API_KEY = "sk-test-0123456789abcdef"
SYSTEM_PROMPT = "You are Robo, a friendly voice bot. Answer in one short sentence."


def unique_id() -> int:
    """A bot id of its own, so no breaker or cached reply of an earlier test or run applies."""
    return secrets.randbelow(2**31)


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def offline_bot() -> BotProfile:
    return BotProfile(
        bot_id=unique_id(),
        name="Robo",
        provider=ProviderSettings(name="offline", kind=OFFLINE),
        system_prompt=SYSTEM_PROMPT,
    )


def remote_bot(kind: str, base_url: str, model_name: str) -> BotProfile:
    bot_id = unique_id()
    provider = ProviderSettings(
        name=f"fake-{kind}-{bot_id}",
        kind=kind,
        base_url=base_url,
        api_key=FAKE_API_KEY,
        timeout_seconds=2.0,
        max_retries=2,
    )
    return BotProfile(
        bot_id=bot_id,
        name="Robo",
        provider=provider,
        model_name=model_name,
        system_prompt=SYSTEM_PROMPT,
        temperature=0.3,
        max_reply_tokens=120,
        cache_seconds=0,
    )


@pytest.fixture
def openai_bot(fake_openai: FakeOpenAI) -> BotProfile:
    return remote_bot(OPENAI, fake_openai.base_url, "gpt-test")


@pytest.fixture
def anthropic_bot(fake_anthropic: FakeAnthropic) -> BotProfile:
    return remote_bot(ANTHROPIC, fake_anthropic.base_url, "claude-test")


# Short enough that a dead worker's bots move within seconds in the tests.
WORKER_ENV = {"BOT_WORKER_TIMEOUT_SECONDS": "3", "BOT_WORKER_HEARTBEAT_SECONDS": "1", "BOT_HOST_ADDRESSES": "127.0.0.1"}


@dataclass
class WorkerProcess:
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text()[-3000:]


@pytest.fixture
def start_bot_worker(transactional_db: None, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts `manage.py runbots` processes against a live server; stops them afterwards."""
    workers: list[WorkerProcess] = []

    def start(server: LiveServer, capacity: int = 8) -> WorkerProcess:
        log = tmp_path / f"worker-{len(workers)}.log"
        process = subprocess.Popen(
            [sys.executable, "manage.py", "runbots", "--server-url", server.ws, "--capacity", str(capacity)],
            cwd=PROJECT_DIR,
            env={**production_env(), **WORKER_ENV},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        worker = WorkerProcess(process=process, log=log)
        workers.append(worker)
        deadline = time.monotonic() + 30
        while not Worker.objects.filter(pid=process.pid, stopped_at__isnull=True).exists():
            assert process.poll() is None and time.monotonic() < deadline, worker.output()
            time.sleep(0.1)
        return worker

    yield start
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.terminate()
            try:
                worker.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.process.kill()


@pytest.fixture
def staff_client(transactional_db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("admin", "admin@example.com", "admin-password"))
    return client


@pytest.fixture
async def close_thread_connections() -> AsyncIterator[None]:
    """Async tests read the database through sync_to_async's thread; close its
    connection afterwards, or the test database cannot be dropped."""
    yield
    await sync_to_async(connections.close_all)()

