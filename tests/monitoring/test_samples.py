"""How samples of several processes add up to the dashboard's numbers, and
that both storages keep, return and drop them."""

import time

import pytest

from monitoring.samples import aggregate, quantile
from tests.monitoring.conftest import make_sample

MS = {"le": [0.001, 0.01, 0.1], "n": [0, 50, 100, 100]}


def test_p95_interpolates_within_its_bucket() -> None:
    # Rank 95 of 100 lies in (10 ms, 100 ms], which holds ranks 51..100.
    assert quantile(0.95, MS) == pytest.approx(0.01 + 0.09 * (95 - 50) / 50)


def test_p95_past_the_last_bound_is_the_last_bound() -> None:
    assert quantile(0.95, {"le": [0.001, 0.01], "n": [10, 10, 100]}) == 0.01


def test_no_observations_have_no_percentile() -> None:
    assert quantile(0.95, {"le": [0.001], "n": [0, 0]}) is None
    assert quantile(0.95, None) is None


def test_two_processes_add_up() -> None:
    now = time.time()
    samples = [
        make_sample(now, "a:1", http_requests=50, http_errors=5, websocket_connections=3, memory_bytes=100 * 2**20,
                    cpu_seconds=2.5, cache_hits=3, cache_misses=1, relay_latency=MS),
        make_sample(now - 5, "a:1", http_requests=50, websocket_connections=1, memory_bytes=90 * 2**20),
        make_sample(now, "b:2", http_requests=100, websocket_connections=4, memory_bytes=50 * 2**20,
                    cpu_seconds=1.0, relay_latency=MS, ready=False),
    ]
    values = aggregate(samples)
    # a: 100 requests over 10 s; b: 100 over 5 s.
    assert values["http_requests_per_second"] == pytest.approx(10 + 20)
    assert values["http_error_rate_percent"] == pytest.approx(100 * 5 / 200)
    # Gauges: each process's peak.
    assert values["websocket_connections"] == 3 + 4
    assert values["memory_mb"] == pytest.approx(150)
    assert values["cpu_percent"] == pytest.approx(100 * (2.5 / 10 + 1.0 / 5))
    assert values["cache_hit_ratio_percent"] == pytest.approx(75)
    # Histograms are merged before the percentile is taken.
    assert values["relay_latency_p95_ms"] == pytest.approx(1000 * (0.01 + 0.09 * (190 - 100) / 100))
    assert values["processes_not_ready"] == 1
    assert values["bot_first_audio_p95_ms"] is None


def test_a_process_that_observed_nothing_leaves_the_percentile_alone() -> None:
    """Servers report an empty bot-latency histogram; the bot worker's must still count."""
    now = time.time()
    nothing = {"le": [], "n": []}
    zeros = {"le": [0.001, 0.01, 0.1], "n": [0, 0, 0, 0]}
    samples = [
        make_sample(now, "server:1", bot_first_audio=nothing),
        make_sample(now, "worker:2", bot_first_audio=MS),
        make_sample(now, "server:3", bot_first_audio=zeros),
    ]
    assert aggregate(samples)["bot_first_audio_p95_ms"] == pytest.approx(1000 * (0.01 + 0.09 * 45 / 50))


def test_no_samples_no_values() -> None:
    assert set(aggregate([]).values()) == {None}


def test_storage_keeps_returns_and_drops_samples(sample_store) -> None:
    now = time.time()
    for age in (3600, 60, 5):
        sample_store.add(make_sample(now - age, http_requests=age))
    assert [s["http_requests"] for s in sorted(sample_store.since(now - 120), key=lambda s: s["t"])] == [60, 5]
    sample_store.prune(now - 30)
    assert [s["http_requests"] for s in sample_store.since(0)] == [5]
