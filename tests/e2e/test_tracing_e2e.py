"""Tracing end to end: a real gateway exporting OTLP/HTTP to a real receiver on loopback.

Span names, kinds, attributes (stable HTTP semantic conventions) and parentage; the backend
receives the upstream span as its parent; parent-based sampling honours the caller's
``traceparent``; at rate 0 nothing is exported. Spans are flushed by stopping the gateway.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from tests.fixtures.otlp import OtlpReceiver, ReceivedSpan
from tests.fixtures.processes import Proc, mint_token, start_gateway

GUARDS = "auth,rate_limit,policy,budget,tenant"  # no audit: no embedded PostgreSQL to start
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def get(gw: Proc, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    req = urllib.request.Request(gw.url + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def traced_gateway(backend: Proc, receiver: OtlpReceiver, rate: str = "1.0") -> Proc:
    return start_gateway({
        "PLANT_GUARDS": GUARDS, "TRACE_SAMPLE_RATE": rate,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "GOOGLE_CLOUD_PROJECT": "proj-e2e",
    }, backend=backend)


def by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans}


def received_traceparent(answer: Any) -> str:
    return next(v for k, v in answer["headers"] if k.lower() == "traceparent")


def log_lines(gw: Proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.output().splitlines() if line.strip()]


def test_a_sampled_request_is_a_server_span_with_a_child_per_guard(
    backend: Proc, otlp_receiver: OtlpReceiver
) -> None:
    gw = traced_gateway(backend, otlp_receiver)
    token = mint_token(roles=["admin"], customer_id="c1")
    headers = {"Authorization": f"Bearer {token}", "traceparent": f"00-{TRACE}-{PARENT}-01",
               "User-Agent": "e2e-tracing",
               "X-Correlation-ID": "7b6f4c1e-3a2d-4e5f-9a8b-1c2d3e4f5a6b"}
    status, answer = get(gw, "/api/v1/agents?limit=5&access_token=hidden-value", headers)
    assert status == 200
    gw.stop()  # the provider's shutdown exports what is queued
    spans = otlp_receiver.wait_for(TRACE, 9)
    named = by_name(spans)

    [server] = [s for s in spans if s.kind == "SERVER"]
    assert server.name == "GET"  # no route template for proxied paths: the method alone
    assert server.parent_span_id == PARENT
    attrs = server.attributes
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/api/v1/agents"
    assert attrs["url.scheme"] == "http"
    assert attrs["url.query"] == "limit=5&access_token=***"
    assert attrs["http.response.status_code"] == 200
    assert attrs["server.address"] == "127.0.0.1" and attrs["server.port"] == gw.port
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["network.protocol.version"] == "1.1"
    assert attrs["user_agent.original"] == "e2e-tracing"
    assert attrs["plant.correlation_id"] == headers["X-Correlation-ID"]
    assert server.resource["service.name"] == "plant-gateway"
    assert "hidden-value" not in json.dumps([s.attributes for s in spans])

    children = {s.name for s in spans if s.parent_span_id == server.span_id}
    guards = {"guard auth", "guard rate_limit", "guard policy", "guard trial_quota",
              "guard budget", "guard tenant"}
    assert guards | {"counters"} <= children
    decision = named["policy decision"]
    assert decision.parent_span_id == named["guard policy"].span_id
    assert decision.attributes["plant.policy.allow"] is True

    [client] = [s for s in spans if s.kind == "CLIENT" and s.name == "GET"]
    assert client.parent_span_id == server.span_id
    assert client.attributes["http.response.status_code"] == 200
    assert client.attributes["url.full"].startswith(backend.url + "/api/v1/agents?")
    assert client.attributes["server.port"] == backend.port
    assert received_traceparent(answer) == f"00-{TRACE}-{client.span_id}-01"

    [line] = [r for r in log_lines(gw) if r.get("correlation_id") == headers["X-Correlation-ID"]
              and r["logger"] == "plant_gateway.request"]
    assert line["logging.googleapis.com/trace"] == f"projects/proj-e2e/traces/{TRACE}"
    assert line["logging.googleapis.com/spanId"] == server.span_id
    assert line["logging.googleapis.com/trace_sampled"] is True


def test_sampling_is_parent_based_and_a_refusal_ends_the_span(
    backend: Proc, otlp_receiver: OtlpReceiver
) -> None:
    gw = traced_gateway(backend, otlp_receiver)
    unsampled = "5bf92f3577b34da6a3ce929d0e0e4736"
    status, answer = get(gw, "/api/v1/agents", {
        "Authorization": f"Bearer {mint_token(roles=['admin'])}",
        "traceparent": f"00-{unsampled}-{PARENT}-00",
    })
    assert status == 200
    forwarded = received_traceparent(answer)
    assert forwarded.startswith(f"00-{unsampled}-") and forwarded.endswith("-00")
    refused = "6bf92f3577b34da6a3ce929d0e0e4736"
    status, _ = get(gw, "/api/v1/agents", {"traceparent": f"00-{refused}-{PARENT}-01"})
    assert status == 401
    status, _ = get(gw, "/api/v1/agents", {"Authorization": f"Bearer {mint_token()}"})
    assert status == 200
    gw.stop()

    spans = otlp_receiver.wait_for(refused, 2)
    assert otlp_receiver.received(unsampled) == []
    server = next(s for s in spans if s.kind == "SERVER")
    assert server.attributes["http.response.status_code"] == 401
    assert server.attributes["plant.refused_by"] == "auth"
    assert server.status_code == 0  # a 4xx is not a server error
    auth = by_name(spans)["guard auth"]
    assert auth.attributes["plant.outcome"] == "refused"
    assert not any(s.name == "guard policy" for s in spans)  # the pipeline stopped at auth
    roots = [s for s in otlp_receiver.received() if s.kind == "SERVER" and not s.parent_span_id]
    assert len(roots) == 1  # the request without a traceparent started a new, sampled trace


def test_at_rate_zero_nothing_is_exported(backend: Proc, otlp_receiver: OtlpReceiver) -> None:
    gw = traced_gateway(backend, otlp_receiver, rate="0")
    status, answer = get(gw, "/api/v1/agents", {
        "Authorization": f"Bearer {mint_token(roles=['admin'])}",
        "traceparent": f"00-{TRACE}-{PARENT}-01",
    })
    assert status == 200
    assert received_traceparent(answer).startswith(f"00-{TRACE}-")  # still propagated
    gw.stop()
    assert otlp_receiver.requests == 0
    started = next(r for r in log_lines(gw) if r.get("event") == "started")
    assert started["tracing"] == "off"


def test_the_trace_id_of_a_request_log_line_is_the_forwarded_one(backend: Proc) -> None:
    """Tracing off: the line names the trace and span the backend receives as its parent."""
    gw = start_gateway({"PLANT_GUARDS": "auth"}, backend=backend)
    status, answer = get(gw, "/api/v1/agents", {
        "Authorization": f"Bearer {mint_token()}", "traceparent": f"00-{TRACE}-{PARENT}-01",
        "X-Correlation-ID": "0b6f4c1e-3a2d-4e5f-9a8b-1c2d3e4f5a6b",
    })
    assert status == 200
    gw.stop()
    forwarded = received_traceparent(answer)
    [line] = [r for r in log_lines(gw) if r.get("correlation_id") ==
              "0b6f4c1e-3a2d-4e5f-9a8b-1c2d3e4f5a6b" and r["logger"] == "plant_gateway.request"]
    assert line["logging.googleapis.com/trace"] == TRACE  # no project: the bare trace id
    assert line["logging.googleapis.com/spanId"] == forwarded.split("-")[2]
    assert "logging.googleapis.com/trace_sampled" not in line
