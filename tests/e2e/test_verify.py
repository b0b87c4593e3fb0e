"""``plant-gateway verify`` against live local gateways: passes on a healthy deployment,
fails with a clear line when the backend is stopped or the policy engine is broken."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from plant_gateway import migrations
from plant_gateway.settings import default_guards
from tests.fixtures.postgres import create_database, drop_database, with_user
from tests.fixtures.processes import JWT_SECRET, ROOT, Proc, free_port, start_backend

HAS_POLICY = importlib.util.find_spec("plant_gateway.guards.policy") is not None
needs_policy = pytest.mark.skipif(not HAS_POLICY, reason="policy step not built yet")


def verify(url: str, *extra: str) -> tuple[int, dict[str, Any]]:
    cmd = [sys.executable, "-m", "plant_gateway.cli", "verify", "--url", url,
           "--jwt-secret", JWT_SECRET, "--timeout", "10", "--json", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["checks"]}


def failed(doc: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in doc["checks"] if c["status"] == "fail"}


@pytest.fixture(scope="module")
def audit_dsn(postgres_dsn: str) -> Iterator[str]:
    dsn = create_database(postgres_dsn, prefix="pgw_verify")
    migrations.upgrade(dsn)
    yield dsn
    drop_database(dsn)


def writer_env(audit_dsn: str, **extra: str) -> dict[str, str]:
    env = {"DATABASE_URL": with_user(audit_dsn, "plant_audit_writer"), **extra}
    if not HAS_POLICY:
        env["PLANT_GUARDS"] = ",".join(g for g in default_guards() if g != "policy")
    return env


@needs_policy
def test_verify_passes_on_a_healthy_gateway(
    backend: Proc, gateway_factory: Callable[..., Proc], audit_dsn: str
) -> None:
    gw = gateway_factory(writer_env(audit_dsn), backend=backend)
    code, doc = verify(gw.url, "--database-url", audit_dsn, "--admin-url", gw.admin_url)
    assert code == 0 and doc["ok"], failed(doc) or gw.output()[-3000:]
    checks = by_name(doc)
    assert checks["health"]["status"] == "pass"
    assert checks["ready: upstream_production"]["status"] == "pass"
    assert checks["pass-through GET /api/v1/agents"]["status"] == "pass"
    assert checks["policy deny GET /api/v1/platform_config"]["status"] == "pass"
    assert checks["audit row (pass-through)"]["status"] == "pass"
    assert checks["audit row (deny)"]["status"] == "pass"


def test_verify_fails_when_the_backend_is_stopped(
    gateway_factory: Callable[..., Proc], audit_dsn: str
) -> None:
    own_backend = start_backend("production")
    gw = gateway_factory(writer_env(audit_dsn), backend=own_backend)
    own_backend.stop()
    code, doc = verify(gw.url, "--admin-url", gw.admin_url)
    assert code == 1 and not doc["ok"]
    bad = failed(doc)
    assert "upstream_production" in bad["ready"]
    assert "ready: upstream_production" in bad
    code, doc = verify(gw.url)  # the public /ready alone: ready or not, nothing named
    assert code == 1 and failed(doc)["ready"] == "HTTP 503"
    assert not any(c["name"].startswith("ready: ") for c in doc["checks"])
    assert "upstream-unavailable" in bad["pass-through GET /api/v1/agents"]
    assert by_name(doc)["health"]["status"] == "pass"


@needs_policy
def test_verify_fails_when_the_policy_engine_is_broken(
    backend: Proc, gateway_factory: Callable[..., Proc], audit_dsn: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway_factory(writer_env(audit_dsn, OPA_SERVICE_URL=dead), backend=backend)
    code, doc = verify(gw.url)
    assert code == 1
    bad = failed(doc)
    deny = bad["policy deny GET /api/v1/platform_config"]
    assert "503" in deny and "policy-unavailable" in deny
    assert "policy-unavailable" in bad["pass-through GET /api/v1/agents"]


def test_verify_fails_when_the_gateway_is_down() -> None:
    code, doc = verify(f"http://127.0.0.1:{free_port()}")
    assert code == 1
    assert failed(doc)["health"].startswith("unreachable")
