"""Logs end to end: what a real gateway process writes on stderr.

Every line is one JSON object with Cloud Logging's field names; start-up is one line naming the
port, workers, guards and backends; one request line per request (who, which guard refused and
why, latencies), no secret in any line; an upstream outage, the circuit breaker and a Redis
outage are one line per failure or state change, not one per request.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from tests.fixtures.processes import Proc, free_port, mint_token, start_backend, start_gateway
from tests.fixtures.redis import RedisServer

REQUEST = "plant_gateway.request"


def call(gw: Proc, path: str, headers: dict[str, str] | None = None,
         method: str = "GET") -> tuple[int, str]:
    """(status, correlation id) of one request."""
    cid = str(uuid.uuid4())
    req = urllib.request.Request(gw.url + path, method=method,
                                 headers={"X-Correlation-ID": cid, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            resp.read()
            return resp.status, cid
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, cid


def lines(gw: Proc) -> list[dict[str, Any]]:
    out = gw.output()
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert all(isinstance(r, dict) for r in records)
    return records


def request_line(records: list[dict[str, Any]], cid: str) -> dict[str, Any]:
    [line] = [r for r in records if r["logger"] == REQUEST and r["correlation_id"] == cid]
    return line


def events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") == name]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_start_up_requests_and_secrets(backend: Proc) -> None:
    gw = start_gateway({"GOOGLE_CLOUD_PROJECT": "proj-e2e"}, backend=backend)
    admin = mint_token(roles=["admin"], customer_id="cust-7")
    readonly = mint_token(roles=["readonly"])
    ok, ok_cid = call(gw, "/api/v1/agents?limit=2&access_token=query-secret", {
        **bearer(admin), "User-Agent": "e2e-logs",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    anonymous, anonymous_cid = call(gw, "/api/v1/agents")
    denied, denied_cid = call(gw, "/api/v1/tasks/task-1", bearer(readonly), method="DELETE")
    assert (ok, anonymous, denied) == (200, 401, 403)
    gw.stop()
    records = lines(gw)

    assert all("severity" in r and "time" in r and "level" not in r for r in records)
    started = records[0]  # no Alembic, embedded PostgreSQL or uvicorn narration before it
    assert started["event"] == "started" and started["port"] == gw.port
    assert started["workers"] == 1
    assert started["guards"] == ["auth", "rate_limit", "policy", "trial_quota", "budget",
                                 "tenant", "audit"]
    assert started["backends"]["counters"] == "in-process"
    assert started["backends"]["audit"].startswith("embedded PostgreSQL")
    assert started["backends"]["policy"].startswith("in-process Rego")
    assert f":{gw.port} (1 worker)" in started["message"]

    line = request_line(records, ok_cid)
    assert line["severity"] == "INFO"
    http = line["httpRequest"]
    assert http["requestMethod"] == "GET" and http["status"] == 200
    assert http["requestUrl"] == f"http://127.0.0.1:{gw.port}/api/v1/agents?limit=2&access_token=***"
    assert http["userAgent"] == "e2e-logs" and http["remoteIp"] == "127.0.0.1"
    assert http["protocol"] == "HTTP/1.1" and int(http["responseSize"]) > 0
    assert http["latency"].endswith("s")
    assert line["logging.googleapis.com/trace"] == (
        "projects/proj-e2e/traces/4bf92f3577b34da6a3ce929d0e0e4736")
    assert len(line["logging.googleapis.com/spanId"]) == 16
    assert line["principal"]["customer_id"] == "cust-7"
    assert line["principal"]["roles"] == ["admin"]
    assert {"total", "gateway", "policy", "upstream"} <= set(line["latency_ms"])
    assert line["upstream"] == "production"

    refused = request_line(records, anonymous_cid)
    assert refused["severity"] == "WARNING" and refused["refused_by"] == "auth"
    assert refused["error_type"] == "unauthorized" and refused["reason"]
    denied_line = request_line(records, denied_cid)
    assert denied_line["refused_by"] == "policy"
    assert denied_line["error_type"] == "permission-denied"
    assert denied_line["policy_reason"]
    text = gw.output()
    for secret in (admin, readonly, "query-secret"):
        assert secret not in text


def test_sampling_keeps_every_failure() -> None:
    gw = start_gateway({"REQUEST_LOG_SAMPLE_RATE": "0", "PLANT_GUARDS": "auth"},
                       backend_url=f"http://127.0.0.1:{free_port()}")
    refused, refused_cid = call(gw, "/api/v1/agents")
    failed, failed_cid = call(gw, "/api/v1/agents", bearer(mint_token(roles=["admin"])))
    assert (refused, failed) == (401, 503)
    gw.stop()
    logged = [r for r in lines(gw) if r["logger"] == REQUEST]
    assert [r["correlation_id"] for r in logged] == [failed_cid]
    assert logged[0]["severity"] == "ERROR" and refused_cid != failed_cid


def test_an_upstream_outage_and_the_breaker_are_a_few_lines() -> None:
    port = free_port()
    gw = start_gateway({
        "PLANT_GUARDS": "auth", "BREAKER_FAILURE_THRESHOLD": "2", "BREAKER_RESET_S": "1",
        "UPSTREAM_RETRIES": "0",
    }, backend_url=f"http://127.0.0.1:{port}")
    token = mint_token(roles=["admin"])
    statuses = [call(gw, "/api/v1/agents", bearer(token))[0] for _ in range(6)]
    assert statuses == [503] * 6
    backend = start_backend("production", port=port)
    try:
        deadline = time.monotonic() + 15
        while call(gw, "/api/v1/agents", bearer(token))[0] != 200:
            assert time.monotonic() < deadline, gw.output()
            time.sleep(0.2)
    finally:
        gw.stop()
        backend.stop()
    records = lines(gw)
    failures = events(records, "upstream_failure")
    assert len(failures) == 1 and failures[0]["kind"] == "connect"
    assert failures[0]["severity"] == "WARNING" and failures[0]["upstream"] == "production"
    states = [r["event"] for r in records if r.get("event", "").startswith("circuit_")]
    assert states[0] == "circuit_open" and states[-1] == "circuit_closed"
    assert "circuit_half_open" in states
    assert events(records, "circuit_open")[0]["severity"] == "ERROR"
    failed = [r for r in records if r["logger"] == REQUEST and r["httpRequest"]["status"] == 503]
    assert len(failed) >= 6 and all(r["severity"] == "ERROR" for r in failed)
    assert {r["error_type"] for r in failed} == {"upstream-unavailable"}


@pytest.mark.slow
def test_a_redis_outage_is_one_down_and_one_up_line(
    backend: Proc, redis_server: RedisServer
) -> None:
    gw = start_gateway({"PLANT_GUARDS": "auth,rate_limit", "REDIS_URL": redis_server.url,
                        "REDIS_TIMEOUT_S": "0.2"}, backend=backend)
    token = mint_token(roles=["admin"])
    assert call(gw, "/api/v1/agents", bearer(token))[0] == 200
    redis_server.stop()
    statuses = [call(gw, "/api/v1/agents", bearer(token))[0] for _ in range(5)]
    assert statuses == [503] * 5
    redis_server.start()
    try:
        deadline = time.monotonic() + 20
        while call(gw, "/api/v1/agents", bearer(token))[0] != 200:
            assert time.monotonic() < deadline, gw.output()
            time.sleep(0.2)
    finally:
        gw.stop()
    records = lines(gw)
    [down] = events(records, "dependency_down")
    [up] = events(records, "dependency_up")
    assert down["dependency"] == up["dependency"] == "redis"
    assert down["severity"] == "ERROR" and up["failed_calls"] >= 5
