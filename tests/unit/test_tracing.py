"""The sampling decision of ``Tracing.begin``: parent-based, a new trace drawn at the rate, and
no SDK span at all for an unsampled request (spans kept by the SDK's in-memory exporter)."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from plant_gateway.context import RequestContext
from plant_gateway.logs import SPAN_KEY
from plant_gateway.pipeline.ingress import propagate_traceparent
from plant_gateway.settings import Settings
from plant_gateway.tracing import Tracing, split_host

CALLER = "4bf92f3577b34da6a3ce929d0e0e4736"


def tracing(rate: float) -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    settings = Settings(plant_backend_url="http://127.0.0.1:9", jwt_secret="s" * 40,
                        trace_sample_rate=rate)
    return Tracing(settings, exporter=exporter), exporter


def context(traceparent: str | None = None) -> RequestContext:
    headers: dict[str, Any] = {"host": "gw.example:8443"}
    if traceparent is not None:
        headers["traceparent"] = traceparent
    return RequestContext(
        request_id="r", correlation_id="c", method="GET", path="/api/v1/agents",
        query_string="", headers=headers, client_ip="203.0.113.9", host="gw.example:8443",
        traceparent=propagate_traceparent(traceparent),
    )


def finish(t: Tracing, exporter: InMemorySpanExporter, ctx: RequestContext) -> list[Any]:
    t.end(ctx, 200)
    t.provider.force_flush()
    spans = list(exporter.get_finished_spans())
    t.shutdown()
    return spans


def test_a_sampled_caller_is_recorded_at_any_rate() -> None:
    t, exporter = tracing(1e-9)
    ctx = context(f"00-{CALLER}-00f067aa0ba902b7-01")
    t.begin(ctx)
    assert SPAN_KEY in ctx.scratch
    assert ctx.traceparent is not None and ctx.traceparent.startswith(f"00-{CALLER}-")
    [span] = finish(t, exporter, ctx)
    assert span.parent.span_id == 0x00F067AA0BA902B7
    assert span.attributes["server.address"] == "gw.example"
    assert span.attributes["server.port"] == 8443


def test_an_unsampled_caller_makes_no_span() -> None:
    t, exporter = tracing(1.0)
    ctx = context(f"00-{CALLER}-00f067aa0ba902b7-00")
    before = ctx.traceparent
    t.begin(ctx)
    assert SPAN_KEY not in ctx.scratch and ctx.traceparent == before
    assert finish(t, exporter, ctx) == []


def test_a_new_trace_is_drawn_at_the_rate() -> None:
    t, exporter = tracing(1e-9)
    ctx = context()
    t.begin(ctx)
    assert SPAN_KEY not in ctx.scratch
    assert ctx.traceparent is not None and ctx.traceparent.endswith("-00")  # said downstream
    assert finish(t, exporter, ctx) == []
    t, exporter = tracing(1.0)
    ctx = context("garbage")  # an invalid traceparent is a new trace
    t.begin(ctx)
    [span] = finish(t, exporter, ctx)
    assert span.parent is None and ctx.traceparent is not None
    sc = span.context
    assert ctx.traceparent == f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"
    assert int(sc.trace_flags) & 1  # sampled (the SDK adds W3C level 2's random-id bit)


def test_split_host() -> None:
    assert split_host("[::1]:8080") == ("::1", 8080)
    assert split_host("example.com") == ("example.com", None)
    assert split_host("example.com:99999") == ("example.com", None)
