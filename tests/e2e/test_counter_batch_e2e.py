"""One Redis round trip per request for all guards, counted on a private Redis server.

A real gateway process (auth, rate limit, policy, trial quota, budget) over HTTP; the server's
own ``total_reads_processed`` counts the gateway's round trips; real policy denials for the
error precedence; a rate-limited request's budget charge is refunded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.e2e.test_policy_e2e import call
from tests.fixtures.processes import Proc, mint_token, start_gateway
from tests.fixtures.redis import RedisServer

TRIAL: dict[str, Any] = {"roles": ["user"], "trial_mode": True, "agent_id": "agent-rt",
         "trial_expires_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7200))}
TASK = ("POST", "/api/v1/agents/agent-1/execute")


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(private_redis: RedisServer, backend: Proc, sandbox_backend: Proc) -> Iterator[Proc]:
    tiers = {t: {"limit": 1000, "period_s": 3600, "burst": 999}
             for t in ("trial", "governor", "enterprise", "anonymous")}
    tiers["paid"] = {"limit": 1, "period_s": 3600, "burst": 0}
    proc = start_gateway({
        "PLANT_GUARDS": "auth,rate_limit,policy,budget",
        "REDIS_URL": private_redis.url,
        "RATE_TIERS": json.dumps(tiers),
        "COST_PER_REQUEST_USD": "0.002",
        "PLANT_SANDBOX_URL": sandbox_backend.url,
    }, backend=backend)
    yield proc
    proc.stop()


@pytest.fixture
def client(private_redis: RedisServer) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(private_redis.url, decode_responses=True)
    yield c
    c.close()


def round_trips(client: redis.Redis, request: Any) -> tuple[Any, int, dict[str, int]]:
    """(request's result, reads the server processed for it, command call counts)."""
    client.config_resetstat()
    result = request()
    reads = int(client.info("stats")["total_reads_processed"]) - 1  # minus this INFO
    stats = client.info("commandstats")
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    return result, reads, calls


def test_full_chain_costs_one_round_trip(gw: Proc, client: redis.Redis) -> None:
    token = mint_token(user_id="rt-trial", jti="rt-jti-1", **TRIAL)
    assert call(gw, *TASK, token)[0] == 200  # warm-up: pooled connection and scripts
    time.sleep(0.1)
    (status, headers, _), reads, calls = round_trips(client, lambda: call(gw, *TASK, token))
    assert status == 200 and headers["x-budget-alert-level"] == "normal"
    assert calls.get("evalsha") == 3 and calls.get("exists") == 1  # rate, quota, budget; jti
    assert reads == 1, calls  # ...all sent in one round trip
    assert client.get(f"q:{{trial:rt-trial}}:{time.strftime('%Y%m%d', time.gmtime())}") == "2"


def test_revoked_token_on_policy_denied_route_is_401(gw: Proc, client: redis.Redis) -> None:
    token = mint_token(roles=["readonly"], user_id="rt-ro", jti="rt-jti-2")
    status, _, body = call(gw, "DELETE", "/api/v1/tasks/task-1", token)
    assert status == 403, body  # the policy refuses a valid readonly token
    client.set("revoked_access:rt-jti-2", "1", ex=60)  # as the backend writes it
    status, _, body = call(gw, "DELETE", "/api/v1/tasks/task-1", token)
    assert status == 401 and body["type"].endswith("/errors/token-revoked"), body


def test_rate_limited_request_leaves_budget_unchanged(gw: Proc, client: redis.Redis) -> None:
    token = mint_token(roles=["user"], user_id="rt-paid", agent_id="agent-refund")
    assert call(gw, "GET", "/api/v1/agents", token)[0] == 200
    [key] = client.keys("{budget}:agent:agent-refund:*")
    assert client.get(key) == "2000"  # µUSD: charged once
    status, _, body = call(gw, "GET", "/api/v1/agents", token)
    assert status == 429 and body["type"].endswith("/errors/rate-limited")
    assert client.get(key) == "2000"  # the refused request's charge was given back
