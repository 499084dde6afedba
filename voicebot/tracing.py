"""OpenTelemetry traces: HTTP requests, WebSocket connects and bot turns.

Only the OpenTelemetry API is used by the code that makes spans; without a
configured SDK its spans are no-ops that cost next to nothing. The SDK and the
OTLP/HTTP exporter are loaded only when OTEL_EXPORTER_OTLP_ENDPOINT is set;
the exporter reads that and the other standard OTEL_* variables itself.
"""

import os
import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

from voicebot import logcontext

TRACER_NAME = "voicebot"

tracer = trace.get_tracer(TRACER_NAME)

_configured = False


def configure_tracing() -> bool:
    """Set up the SDK once per process if an endpoint is configured; returns whether it is."""
    global _configured
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    if not endpoint or _configured:
        return _configured
    # Imported here so a server without an endpoint never loads the SDK.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "voicebot"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    return True


def header_carrier(headers: Mapping[str, str]) -> dict[str, str]:
    """Lower-cased headers, for extracting an incoming traceparent."""
    return {name.lower(): value for name, value in headers.items()}


# What a bot turn's span carries: how it went and how long each stage took.
# Not what was said, nor who said it.
TURN_ATTRIBUTES = (
    "source",
    "interrupted",
    "end_of_speech_ms",
    "recognition_ms",
    "model_first_token_ms",
    "synthesis_first_audio_ms",
    "first_audio_ms",
    "barge_in_ms",
)


def trace_turn(fields: Mapping[str, Any], *, started_at: float) -> None:
    """A finished bot turn as a span from its start until now (a no-op without the SDK)."""
    attributes = {f"voicebot.turn.{name}": fields[name] for name in TURN_ATTRIBUTES if fields.get(name) is not None}
    attributes["voicebot.turn.failed"] = bool(fields.get("error"))
    attributes.update({f"voicebot.{name}": value for name, value in logcontext.current().items()})
    span = tracer.start_span("bot.turn", start_time=int(started_at * 1e9), attributes=attributes)
    if fields.get("error"):
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(fields["error"])[:200]))
    span.end(end_time=time.time_ns())
