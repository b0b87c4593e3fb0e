"""Remote OPA backend against a real HTTP server process serving the OPA Data API.

Covers decisions, decision ids, timeout, 5xx, undefined results, the breaker and /health.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TypedDict, Unpack

import pytest

from plant_gateway.backends.base import DependencyError
from plant_gateway.backends.policy_remote import RemotePolicyEngine
from plant_gateway.settings import Settings
from tests.integration.opa_server import OpaServer, free_port

ALLOW = {"jwt": {"roles": ["user"]}, "resource": "agents", "action": "read"}
DENY = {"jwt": {"roles": ["readonly"]}, "resource": "agents", "action": "create"}


@pytest.fixture(scope="module")
def opa() -> Iterator[OpaServer]:
    server = OpaServer()
    yield server
    server.stop()


class EngineOverrides(TypedDict, total=False):
    opa_decision_path: str
    breaker_failure_threshold: int
    breaker_reset_s: float


def engine_for(opa: OpaServer, **extra: Unpack[EngineOverrides]) -> RemotePolicyEngine:
    extra.setdefault("opa_decision_path", "plant/gateway/decision")
    settings = Settings(plant_backend_url="http://127.0.0.1:9", opa_service_url=opa.url,
                        opa_timeout_s=0.5, **extra)
    return RemotePolicyEngine(settings)


async def test_decisions_and_decision_id(opa: OpaServer) -> None:
    opa.mode("ok")
    engine = engine_for(opa)
    await engine.start()
    try:
        allowed = await engine.decide(ALLOW)
        denied = await engine.decide(DENY)
        assert allowed["allow"] is True and allowed["decision_id"]
        assert denied["allow"] is False and denied["required_permission"] == "agents:create"
        assert allowed["decision_id"] != denied["decision_id"]
        status = await engine.check()
        assert status.ok
    finally:
        await engine.close()


@pytest.mark.parametrize("mode", ["slow", "error", "undefined", "garbage"])
async def test_failures_raise(opa: OpaServer, mode: str) -> None:
    opa.mode(mode)
    engine = engine_for(opa)
    try:
        with pytest.raises(DependencyError):
            await engine.decide(ALLOW)
    finally:
        await engine.close()
        opa.mode("ok")


async def test_boolean_result_of_deployed_policies(opa: OpaServer) -> None:
    opa.mode("bool")
    engine = engine_for(opa, opa_decision_path="gateway/rbac/allow")
    try:
        decision = await engine.decide(ALLOW)
        assert decision["allow"] is True and decision["target_backend"] == "production"
    finally:
        await engine.close()
        opa.mode("ok")


async def test_breaker_opens_then_recovers(opa: OpaServer) -> None:
    engine = engine_for(opa, breaker_failure_threshold=2, breaker_reset_s=0.3)
    try:
        opa.mode("error")
        for _ in range(2):
            with pytest.raises(DependencyError, match="HTTP 500"):
                await engine.decide(ALLOW)
        before = opa.state()["decisions"]
        with pytest.raises(DependencyError, match="circuit is open"):
            await engine.decide(ALLOW)
        assert opa.state()["decisions"] == before
        opa.mode("ok")
        await asyncio.sleep(0.35)
        assert (await engine.decide(ALLOW))["allow"] is True
        assert engine.breaker.state == "closed"
    finally:
        await engine.close()
        opa.mode("ok")


async def test_health_down_and_unreachable(opa: OpaServer) -> None:
    opa.mode("down")
    engine = engine_for(opa)
    try:
        assert not (await engine.check()).ok
    finally:
        await engine.close()
        opa.mode("ok")
    gone = RemotePolicyEngine(Settings(plant_backend_url="http://127.0.0.1:9",
                                       opa_service_url=f"http://127.0.0.1:{free_port()}"))
    try:
        assert not (await gone.check()).ok
        with pytest.raises(DependencyError, match="unreachable"):
            await gone.decide(ALLOW)
    finally:
        await gone.close()
