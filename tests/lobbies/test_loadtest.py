"""`manage.py loadtest` runs and reports (a smoke run of a few seconds; the
figures themselves are for people to read, never asserted here), and its
sweep's rule for where a rate stops."""

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lobbies.loadtest.clients import Tally
from lobbies.loadtest.scenarios import Options, sweep
from tests.conftest import PROJECT_DIR, production_env


def loadtest(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "loadtest", "--quick", *arguments],
        cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=240,
    )


@pytest.fixture
def env(transactional_db: None, tmp_path: Path) -> dict[str, str]:
    return {**production_env(), "VOICEBOT_DATA_DIR": str(tmp_path)}


def test_it_measures_the_project_beside_the_reference_relay(env: dict[str, str], tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    run = loadtest("--reference", "--json", str(figures), env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    # Progress while it runs, then the table with the project as multiples of the reference.
    assert "pairs: offered" in run.stderr and "storm:" in run.stderr
    assert "project×1 / reference" in run.stdout
    for figure in ("pairs_rate", "rooms_rate", "fanout_rate", "idle_connects_per_second", "storm_seconds"):
        assert figure in run.stdout
    results = json.loads(figures.read_text())["results"]
    assert set(results) == {"project×1", "reference"}
    for target in results.values():
        assert target["pairs_rate"] > 0 and target["idle_kib_per_connection"] is not None
        assert target["storm_failures"] == 0 and target["pairs_errors"] == 0
        assert target["idle_generator_cpu_ms_per_connect"] > 0
    assert results["project×1"]["idle_server_cpu_ms_per_connect"] > 0


def test_a_run_compares_with_a_saved_baseline(env: dict[str, str]) -> None:
    saved = loadtest("--scenarios", "idle", "--save-baseline", "smoke", env=env)
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert "Baseline saved" in saved.stderr
    # A tolerance so wide that no smoke-run noise counts as a regression.
    compared = loadtest("--scenarios", "idle", "--compare", "smoke", "--tolerance", "100", env=env)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "Compared with baseline 'smoke'" in compared.stdout
    assert "project×1 idle_connects_per_second" in compared.stdout

    missing = loadtest("--scenarios", "idle", "--compare", "nonesuch", env=env)
    assert missing.returncode != 0 and "no baseline 'nonesuch'" in missing.stderr


def test_it_refuses_a_server_elsewhere_unless_told(env: dict[str, str]) -> None:
    run = loadtest("--url", "http://192.0.2.10:8000", env=env)
    assert run.returncode != 0
    assert "not on this machine; pass --allow-remote" in run.stderr


class Unmeasured:
    """A target whose CPU and memory are not known (as a --url server without --server-pid)."""

    def cpu_seconds(self) -> None:
        return None

    def rss_bytes(self) -> None:
        return None


async def test_a_sweep_tries_a_rate_again_after_one_latency_spike() -> None:
    tally = Tally()
    # The latency of every message of each step after the warm-up: the rate of
    # 200/s has one spike, the rate of 400/s two in a row.
    plan = iter([0.001, 0.050, 0.001, 0.050, 0.050])
    latency: dict[int, float] = {}

    async def send(index: int, number: int) -> None:
        if number not in latency:
            latency[number] = next(plan) if latency else 0.001
        tally.steps[number].received += 1
        tally.steps[number].latencies.append(latency[number])

    lines: list[str] = []
    options = Options(start_rate=100, step_seconds=0.2, growth=2.0, max_rate=1000, refinements=0)
    figures = await sweep("pairs", Unmeasured(), tally, send, 1, options, lines.append)

    assert verdicts(lines) == [
        ("100", "ok"), ("200", "p99 too high"), ("200", "ok"), ("400", "p99 too high"), ("400", "p99 too high")
    ]
    assert figures["pairs_p99_ms"] == pytest.approx(1.0) and figures["pairs_rate"] > 150


def verdicts(lines: list[str]) -> list[tuple[str, str]]:
    """(rate offered, verdict) of each step's progress line."""
    return [(line.split("offered ")[1].split("/s")[0], line.rsplit(": ", 1)[1]) for line in lines]


async def test_a_sweep_narrows_the_limit_down_between_the_last_pass_and_the_first_failure() -> None:
    tally = Tally()
    # A server that delivers 300 messages a second and loses the rest.
    step_seconds = 0.2
    capacity = 300 * step_seconds
    sent: Counter[int] = Counter()

    async def send(index: int, number: int) -> None:
        sent[number] += 1
        if sent[number] <= capacity:
            tally.steps[number].received += 1
            tally.steps[number].latencies.append(0.001)

    lines: list[str] = []
    options = Options(start_rate=100, step_seconds=step_seconds, growth=2.0, max_rate=1000, refinements=2)
    figures = await sweep("pairs", Unmeasured(), tally, send, 1, options, lines.append)

    # 400/s fails; then halfway (log scale) between 200 and 400, then between 283 and 400.
    assert verdicts(lines) == [("100", "ok"), ("200", "ok"), ("400", "lost messages"), ("283", "ok"), ("336", "lost messages")]
    assert 250 < figures["pairs_rate"] < 300
    assert figures["pairs_loss_at_limit"] == round(336.4 * step_seconds) - capacity


async def test_a_sweep_reports_the_load_generators_own_cpu() -> None:
    """So that a run shows when the generator, not the server, was the limit."""

    async def sweep_spending(cpu_seconds_per_message: float) -> float:
        tally = Tally()

        async def send(index: int, number: int) -> None:
            spent = time.process_time() + cpu_seconds_per_message
            while time.process_time() < spent:
                pass
            tally.steps[number].received += 1
            tally.steps[number].latencies.append(0.001)

        lines: list[str] = []
        options = Options(start_rate=100, step_seconds=0.5, max_rate=100)
        figures = await sweep("pairs", Unmeasured(), tally, send, 1, options, lines.append)
        assert "generator CPU" in lines[0]
        return figures["pairs_generator_cpu_percent"]

    # 100 messages a second, each costing 3 ms of the generator's CPU: about 30% of a core.
    assert await sweep_spending(0.003) >= await sweep_spending(0.0) + 15
