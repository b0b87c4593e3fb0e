"""The request log line: Cloud Logging's fields from a finished RequestContext, sampling, levels,
and no secret in the line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from plant_gateway.context import Identity, RequestContext
from plant_gateway.request_log import SPAN_KEY, RequestLog
from plant_gateway.settings import Settings

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJlLXZhbHVl"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"plant_backend_url": "http://127.0.0.1:9", "jwt_secret": "s" * 40,
                            "cp_registration_key": "svc-key-0123456789"}
    return Settings(**{**base, **overrides})


def context(path: str = "/api/v1/agents", query: str = "", **fields: Any) -> RequestContext:
    ctx = RequestContext(
        request_id="11111111-1111-4111-8111-111111111111",
        correlation_id="22222222-2222-4222-8222-222222222222", method="GET", path=path,
        query_string=query, headers={"user-agent": "tests/1.0", "host": "gw.example"},
        client_ip="203.0.113.9", host="gw.example", scheme="https", traceparent=TRACEPARENT,
    )
    for name, value in fields.items():
        setattr(ctx, name, value)
    return ctx


class Sink:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def __call__(self, line: bytes) -> None:
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        self.lines.append(json.loads(line))


@pytest.fixture
def info() -> Iterator[None]:
    logger = logging.getLogger("plant_gateway.request")
    saved = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(saved)


def logged(ctx: RequestContext, status: int = 200, **overrides: Any) -> dict[str, Any] | None:
    sink = Sink()
    RequestLog(settings(**overrides), write=sink).record(ctx, status, 12.3456, 1234)
    return sink.lines[0] if sink.lines else None


def test_the_line_has_cloud_loggings_fields(info: None) -> None:
    ctx = context(query="limit=5", identity=Identity(
        user_id="u-1", customer_id="c-1", roles=["admin"], email="a@b.c"))
    ctx.upstream_latency_ms, ctx.policy_latency_ms, ctx.content_length = 10.0, 0.5, 42
    line = logged(ctx, google_cloud_project="proj-1")
    assert line is not None
    assert line["severity"] == "INFO" and line["logger"] == "plant_gateway.request"
    assert line["message"] == "GET /api/v1/agents 200 12.3 ms"
    assert line["httpRequest"] == {
        "requestMethod": "GET", "requestUrl": "https://gw.example/api/v1/agents?limit=5",
        "status": 200, "responseSize": "1234", "remoteIp": "203.0.113.9",
        "latency": "0.012346s", "protocol": "HTTP/1.1", "userAgent": "tests/1.0",
        "requestSize": "42",
    }
    assert line["logging.googleapis.com/trace"] == (
        "projects/proj-1/traces/4bf92f3577b34da6a3ce929d0e0e4736")
    assert line["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert line["principal"] == {"user_id": "u-1", "customer_id": "c-1", "roles": ["admin"]}
    assert line["latency_ms"] == {"total": 12.346, "gateway": 2.346, "policy": 0.5,
                                  "upstream": 10.0}
    assert line["upstream"] == "production"
    assert "a@b.c" not in json.dumps(line)


def test_a_refusal_names_the_guard_and_why(info: None) -> None:
    ctx = context(refused_by="policy", error_type="permission-denied",
                  error_message="Permission 'delete_agent' is required.",
                  policy_decision={"allow": False, "reason": "role readonly lacks delete"})
    line = logged(ctx, status=403)
    assert line is not None and line["severity"] == "WARNING"
    assert line["refused_by"] == "policy" and line["error_type"] == "permission-denied"
    assert line["reason"] == "Permission 'delete_agent' is required."
    assert line["policy_reason"] == "role readonly lacks delete"


def test_no_secret_reaches_the_line(info: None) -> None:
    ctx = context(path=f"/api/v1/reset/{JWT}", query=f"access_token=abc123&q=ok&id_token={JWT}",
                  error_message="key svc-key-0123456789 refused")
    ctx.headers["user-agent"] = f"agent {JWT}"
    line = logged(ctx, status=500)
    text = json.dumps(line)
    assert JWT not in text and "abc123" not in text and "svc-key-0123456789" not in text
    assert line is not None
    assert line["httpRequest"]["requestUrl"] == (
        "https://gw.example/api/v1/reset/***?access_token=***&q=ok&id_token=***")
    assert line["reason"] == "***"


def test_sampling_keeps_failures_and_traced_requests(info: None) -> None:
    assert logged(context(), request_log_sample_rate=0) is None
    assert logged(context(), status=404, request_log_sample_rate=0) is None
    failed = logged(context(), status=502, request_log_sample_rate=0)
    assert failed is not None and failed["severity"] == "ERROR"
    broken = logged(context(error_type="upstream-stream-error"), request_log_sample_rate=0)
    assert broken is not None and broken["severity"] == "ERROR"  # a 200 whose body broke
    traced = context()
    traced.scratch[SPAN_KEY] = object()
    line = logged(traced, request_log_sample_rate=0)
    assert line is not None and line["logging.googleapis.com/trace_sampled"] is True


def test_the_log_level_filters_by_severity() -> None:
    logger = logging.getLogger("plant_gateway.request")
    saved = logger.level
    logger.setLevel(logging.WARNING)
    try:
        assert logged(context()) is None
        assert logged(context(), status=429) is not None
    finally:
        logger.setLevel(saved)
