"""End-to-end resilience: backend down -> 503, circuit breaker open then half-open, /ready.

Each test owns its backend process so it can stop and restart it.
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.e2e.wire import metric
from tests.fixtures.processes import start_backend


async def _get(url: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json(content_type=None)


async def _circuit(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    prefix = 'plant_gateway_circuit_state{upstream="production"}'
    line = next(x for x in text.splitlines() if x.startswith(prefix))
    return line.split()[-1]


async def test_backend_down_503_breaker_opens_then_half_opens(gateway_factory) -> None:
    backend = start_backend("production")
    gw = gateway_factory(
        {"PLANT_GUARDS": "tenant", "BREAKER_FAILURE_THRESHOLD": "2", "BREAKER_RESET_S": "1",
         "UPSTREAM_RETRIES": "1", "UPSTREAM_CONNECT_TIMEOUT_S": "1"},
        backend=backend,
    )
    try:
        assert (await _get(gw.url + "/api/v1/x"))[0] == 200
        backend.stop()
        for _ in range(2):
            status, doc = await _get(gw.url + "/api/v1/x")
            assert status == 503
            assert doc["type"].endswith("/errors/upstream-unavailable")
            assert "connection failed" in doc["detail"]
        assert await _circuit(gw.admin_url) == "2.0"  # open
        status, doc = await _get(gw.url + "/api/v1/x")
        assert status == 503 and "circuit open" in doc["detail"]

        backend = start_backend("production", port=backend.port)
        await asyncio.sleep(1.2)  # past BREAKER_RESET_S: the next call is the half-open probe
        status, doc = await _get(gw.url + "/api/v1/x")
        assert status == 200 and doc["backend"] == "production"
        assert await _circuit(gw.admin_url) == "0.0"  # closed again
        assert metric(gw.admin_url, "plant_gateway_circuit_opened_total",
                      upstream="production") == 1.0  # opened once
    finally:
        backend.stop()


async def test_ready_turns_503_when_backend_is_gone(gateway_factory) -> None:
    backend = start_backend("production")
    gw = gateway_factory({"PLANT_GUARDS": "tenant"}, backend=backend)
    try:
        status, doc = await _get(gw.admin_url + "/ready")
        assert status == 200 and doc["status"] == "ready"
        backend.stop()
        status, doc = await _get(gw.admin_url + "/ready")
        assert status == 503
        assert doc["dependencies"]["upstream_production"]["status"] == "down"
        assert await _get(gw.url + "/ready") == (503, {"status": "not_ready"})  # no details
        status, doc = await _get(gw.url + "/openapi.json")
        assert status == 502 and doc["type"].endswith("/errors/bad-gateway")
        status, _ = await _get(gw.url + "/health")
        assert status == 200  # liveness never depends on the backend
    finally:
        backend.stop()
