"""The deployed OPA's packages combined with our bundle, against a real OPA-API server process.

The server evaluates stand-ins of the deployed packages (``tests/fixtures/deployed_opa``):
same paths (``/v1/data/gateway/<package>/allow``) and answer shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plant_gateway.backends.base import DependencyError
from plant_gateway.backends.policy import create
from plant_gateway.backends.policy_packages import PackagesPolicyEngine
from plant_gateway.settings import Settings
from tests.integration.opa_server import OpaServer

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "deployed_opa"


@pytest.fixture(scope="module")
def deployed_opa() -> Iterator[OpaServer]:
    server = OpaServer(FIXTURES)
    yield server
    server.stop()


def engine(opa: OpaServer, **extra: Any) -> PackagesPolicyEngine:
    settings = Settings(plant_backend_url="http://127.0.0.1:9", OPA_URL=opa.url, **extra)
    made = create(settings)  # OPA_URL alone, as the deployed Terraform sets it
    assert isinstance(made, PackagesPolicyEngine)
    return made


def policy_input(roles: list[str], resource: str = "agents", action: str = "read",
                 **jwt: Any) -> dict[str, Any]:
    return {
        "jwt": {"user_id": "u-1", "sub": "u-1", "roles": roles, "trial_mode": False, **jwt},
        "resource": resource, "action": action, "method": "GET",
        "path": f"/api/v1/{resource}", "gateway_type": "PLANT",
        "client": {"service_key": False, "service_account": None}, "flags": {},
        "now_ns": 1,
    }


@pytest.mark.parametrize("roles", [["user"], ["agent_ops"], ["readonly"], ["admin"]])
async def test_real_roles_pass_where_rbac_pp_alone_would_refuse(
    deployed_opa: OpaServer, roles: list[str]
) -> None:
    gate = engine(deployed_opa)
    try:
        decision = await gate.decide(policy_input(roles))
        assert decision["allow"] is True
        assert "gateway.agent_budget" in decision["policies"]
        assert "gateway.rbac_pp" not in decision["policies"]  # a PP gateway's check only
    finally:
        await gate.close()


async def test_a_package_refusal_wins_and_is_named(deployed_opa: OpaServer) -> None:
    gate = engine(deployed_opa)
    try:
        broke = await gate.decide(policy_input(["user"], agent_id="agent-broke"))
        assert (broke["allow"], broke["status"], broke["kind"]) == (False, 402, "budget-exceeded")
        assert broke["packages"]["agent_budget"]["deny_reason"] == "agent budget exhausted"
        trial = await gate.decide(policy_input(
            ["user"], resource="platform_config", trial_mode=True,
            trial_expires_at="2099-01-01T00:00:00Z",
        ))
        assert trial["allow"] is False  # our bundle refuses first (governor-only resource)
    finally:
        await gate.close()


async def test_rbac_pp_is_asked_on_a_pp_gateway(deployed_opa: OpaServer) -> None:
    gate = engine(deployed_opa, GATEWAY_TYPE="PP")
    try:
        doc = {**policy_input(["admin"]), "gateway_type": "PP"}
        assert (await gate.decide(doc))["allow"] is True
        refused = await gate.decide({**policy_input(["developer"]), "gateway_type": "PP"})
        assert refused["allow"] is False and refused["kind"] == "permission-denied"
        assert "No recognized role" in refused["reason"]
    finally:
        await gate.close()


async def test_answers_are_cached_then_asked_again(deployed_opa: OpaServer) -> None:
    gate = engine(deployed_opa, OPA_CACHE_TTL_S=60)
    try:
        before = deployed_opa.state()["decisions"]
        for _ in range(5):
            await gate.decide(policy_input(["user"], user_id="u-cache"))
        asked = deployed_opa.state()["decisions"] - before
        assert asked == 3  # governor_role, sandbox_routing, agent_budget: once each
    finally:
        await gate.close()


@pytest.mark.parametrize("mode", ["error", "undefined", "garbage", "slow"])
async def test_a_package_that_cannot_answer_denies(deployed_opa: OpaServer, mode: str) -> None:
    gate = engine(deployed_opa, OPA_CACHE_TTL_S=0)
    deployed_opa.mode(mode)
    try:
        with pytest.raises(DependencyError):
            await gate.decide(policy_input(["user"], user_id=f"u-{mode}"))
    finally:
        deployed_opa.mode("ok")
        await gate.close()


async def test_missing_package_is_undefined_and_denies(deployed_opa: OpaServer) -> None:
    gate = engine(deployed_opa, OPA_PACKAGES="sandbox_routing,no_such_package")
    try:
        with pytest.raises(DependencyError):
            await gate.decide(policy_input(["user"], user_id="u-missing"))
    finally:
        await gate.close()
