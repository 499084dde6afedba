"""Prometheus metrics of the bots, exported by whichever process runs them
(a runbots worker on its --metrics-port, or the server on the embedded default).

The provider label is the provider kind (offline, openai, anthropic), never a
provider's name, a bot or a lobby, so the number of series stays fixed.
docs/metrics.md describes each metric.
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from bots.config import ANTHROPIC, OFFLINE, OPENAI, BotProfile

if TYPE_CHECKING:  # bots.pipeline imports bots.llm, which imports this module
    from bots.pipeline import TurnRecord

PROVIDER_KINDS = (OFFLINE, OPENAI, ANTHROPIC)
BREAKER_STATES = ("closed", "open", "half_open")
TURN_SOURCES = ("voice", "chat", "greeting")
TURN_OUTCOMES = ("ok", "error", "interrupted")
# Stage latencies run from tens of milliseconds (offline, warm) to seconds (remote models).
STAGE_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

bots_in_rooms = Gauge("voicebot_bots_in_rooms", "Bots this process currently runs in lobbies.")
turns = Counter(
    "voicebot_bot_turns_total",
    "Finished bot turns by source (voice, chat, greeting) and outcome (ok, error, interrupted).",
    ["source", "outcome"],
)
stage_latency = Histogram(
    "voicebot_bot_stage_seconds",
    "Bot turn stage latencies by stage and provider kind: recognition (end of speech to transcript), "
    "model_first_token (request to first text), synthesis_first_audio (first text to first audio "
    "synthesized), first_audio (end of user speech to first bot audio sent).",
    ["stage", "provider"],
    buckets=STAGE_BUCKETS,
)
provider_errors = Counter(
    "voicebot_bot_provider_errors_total",
    "Language-model calls that failed after their retries, by provider kind.",
    ["provider"],
)

for _kind in PROVIDER_KINDS:
    provider_errors.labels(_kind)
for _source in TURN_SOURCES:
    for _outcome in TURN_OUTCOMES:
        turns.labels(_source, _outcome)


def kind_label(kind: str) -> str:
    return kind if kind in PROVIDER_KINDS else "other"


def speech_kind(profile: BotProfile) -> str:
    provider = profile.speech.provider
    return kind_label(provider.kind) if provider else OFFLINE


def turn_finished(turn: "TurnRecord", profile: BotProfile) -> None:
    """Count a turn and observe its stages; a stage that did not run is None."""
    outcome = "error" if turn.error else "interrupted" if turn.interrupted else "ok"
    source = turn.source if turn.source in TURN_SOURCES else "other"
    turns.labels(source, outcome).inc()
    model_kind = kind_label(profile.provider.kind)
    stages = (
        ("recognition", speech_kind(profile), turn.recognition_ms),
        ("model_first_token", model_kind, turn.model_first_token_ms),
        ("synthesis_first_audio", speech_kind(profile), turn.synthesis_first_audio_ms),
        ("first_audio", model_kind, turn.first_audio_ms),
    )
    for stage, kind, milliseconds in stages:
        if milliseconds is not None:
            stage_latency.labels(stage, kind).observe(milliseconds / 1000)


def provider_failed(kind: str) -> None:
    provider_errors.labels(kind_label(kind)).inc()


class BreakerCollector(Collector):
    """Circuit breakers of this process by provider kind and state: how many
    providers of each kind are in each state, read at scrape time."""

    def describe(self) -> Iterator[Metric]:
        # Without describe() the registry calls collect() on registration,
        # while bots.llm (which imports this module) is still half-loaded.
        yield GaugeMetricFamily("voicebot_bot_provider_breakers", "", labels=["provider", "state"])

    def collect(self) -> Iterator[Metric]:
        from bots import llm  # bots.llm imports this module

        counts = {(kind, state): 0 for kind in PROVIDER_KINDS for state in BREAKER_STATES}
        for (kind, _name, _url), breaker in list(llm._breakers.items()):
            key = (kind_label(kind), breaker.state())
            counts[key] = counts.get(key, 0) + 1
        family = GaugeMetricFamily(
            "voicebot_bot_provider_breakers",
            "Providers whose circuit breaker is in each state, by provider kind (closed, open, half_open).",
            labels=["provider", "state"],
        )
        for (kind, state), count in sorted(counts.items()):
            family.add_metric([kind, state], count)
        yield family


REGISTRY.register(BreakerCollector())
