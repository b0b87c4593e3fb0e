"""Policy enforcement end to end: real gateway processes, real backends, real HTTP.

Role x action class, trial restrictions, governor redirects, sandbox routing, remote OPA
failures (503, request not forwarded) and a broken bundle refused at start-up.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.processes import Proc, mint_token, start_gateway
from tests.integration.opa_server import OpaServer

ROOT = Path(__file__).resolve().parents[2]
SENSITIVE = [
    ("DELETE", "/api/v1/agents/agent-1", "delete_agent"),
    ("PUT", "/api/v1/billing/plan", "update_billing"),
    ("PATCH", "/api/v1/subscriptions/sub-1", "change_subscription"),
    ("GET", "/api/v1/customers/cust-1/export", "export_data"),
    ("DELETE", "/api/v1/customers/cust-1", "delete_customer"),
]
# (method, path) per action class; minimum hierarchy level from the policy data
ACTION_CLASSES = {
    "read": ("GET", "/api/v1/agents/agent-1", 7),
    "create": ("POST", "/api/v1/tasks", 3),
    "update": ("PATCH", "/api/v1/tasks/task-1", 3),
    "execute": ("POST", "/api/v1/agents/agent-1/execute", 3),
    "delete": ("DELETE", "/api/v1/tasks/task-1", 2),
    "approve": ("POST", "/api/v1/tasks/task-1/approve", 2),
}
ROLE_LEVELS = {"admin": 1, "customer_admin": 2, "user": 3, "agent_ops": 3, "manager": 4,
               "readonly": 7, "unknown_role": 99}


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


OPENER = urllib.request.build_opener(NoRedirect)


def call(gw: Proc, method: str, path: str, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    all_headers = dict(headers or {})
    if token:
        all_headers["Authorization"] = f"Bearer {token}"
    data = b"{}" if method in ("POST", "PUT", "PATCH") else None
    if data:
        all_headers["Content-Type"] = "application/json"
    req = urllib.request.Request(gw.url + path, method=method, headers=all_headers, data=data)
    try:
        with OPENER.open(req, timeout=10) as resp:
            status, hdrs, body = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, body = exc.code, dict(exc.headers), exc.read()
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = body
    return status, {k.lower(): v for k, v in hdrs.items()}, parsed


def iso(offset_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset_s))


def token(roles: list[str], **claims: Any) -> str:
    return mint_token(roles=roles, **claims)


def trial_token(offset_s: int = 3600) -> str:
    return token(["user"], trial_mode=True, trial_expires_at=iso(offset_s))


@pytest.fixture(scope="module")
def gw(backend: Proc, sandbox_backend: Proc) -> Iterator[Proc]:
    proc = start_gateway({
        "PLANT_GUARDS": "auth,policy",
        "PLANT_SANDBOX_URL": sandbox_backend.url,
        "APPROVAL_UI_URL": "https://approvals.test/approve",
        "SERVICE_KEY_ROUTES": "",  # the governor cases use /api/v1/customers with a JWT
    }, backend=backend)
    yield proc
    proc.stop()


def test_role_by_action_class(gw: Proc) -> None:
    wrong = []
    for role, level in ROLE_LEVELS.items():
        tok = token([role])
        for action, (method, path, needed) in ACTION_CLASSES.items():
            status, _, body = call(gw, method, path, tok)
            expected = 200 if level <= needed else 403
            if status != expected:
                wrong.append(f"{role} {action}: {status} (expected {expected})")
                continue
            required = body.get("required_permission") if status == 403 else None
            if status == 403 and required != f"{path.split('/')[3]}:{action}":
                wrong.append(f"{role} {action}: required_permission {required}")
    assert not wrong, "\n".join(wrong)


def test_trial_user_blocked_from_paid_resources(gw: Proc) -> None:
    tok = trial_token()
    for path in ("/api/v1/billing", "/api/v1/invoices/inv-1", "/api/v1/subscriptions"):
        status, headers, body = call(gw, "GET", path, tok)
        assert status == 403, path
        assert headers["content-type"].startswith("application/problem+json")
        assert body["type"].endswith("/errors/permission-denied")
    paid = token(["user"])
    assert call(gw, "GET", "/api/v1/invoices/inv-1", paid)[0] == 200


def test_expired_trial(gw: Proc) -> None:
    status, _, body = call(gw, "GET", "/api/v1/agents", trial_token(-60))
    assert status == 403 and body["type"].endswith("/errors/trial-expired")


@pytest.mark.parametrize(("method", "path", "action"), SENSITIVE)
def test_sensitive_action_needs_governor(gw: Proc, method: str, path: str, action: str) -> None:
    status, headers, _ = call(gw, method, path, token(["customer_admin"], agent_id="agent-77"))
    assert status == 307
    assert headers["location"].startswith(f"https://approvals.test/approve?action={action}")
    assert headers["x-governor-approval-required"] == "true"
    assert headers["x-governor-action"] == action
    assert headers["x-governor-agent-id"] == "agent-77"
    governor = token(["admin"], governor_agent_id="gov-1")
    status, _, body = call(gw, method, path, governor)
    assert status == 200 and body["backend"] == "production"


def test_trial_goes_to_sandbox_paid_to_production(gw: Proc) -> None:
    status, headers, body = call(gw, "GET", "/api/v1/agents", trial_token())
    assert status == 200 and body["backend"] == "sandbox"
    assert headers["x-target-backend"] == "sandbox"
    status, headers, body = call(gw, "GET", "/api/v1/agents", token(["user"]))
    assert status == 200 and body["backend"] == "production"
    assert headers["x-target-backend"] == "production"


def test_remote_opa_failures_deny_and_do_not_forward() -> None:
    opa = OpaServer()  # also the recording backend: its hit counter proves forwarding
    gw = start_gateway({"PLANT_GUARDS": "auth,policy", "OPA_SERVICE_URL": opa.url,
                        "OPA_DECISION_PATH": "plant/gateway/decision",
                        "OPA_TIMEOUT_S": "0.5", "BREAKER_FAILURE_THRESHOLD": "50"},
                       backend_url=opa.url)
    try:
        tok = token(["user"])
        assert call(gw, "GET", "/api/v1/agents", tok)[0] == 200
        assert opa.state()["hits"] == 1
        for mode in ("error", "slow", "undefined"):
            opa.mode(mode)
            status, _, body = call(gw, "GET", "/api/v1/agents", tok)
            assert status == 503, mode
            assert body["type"].endswith("/errors/policy-unavailable")
        assert opa.state()["hits"] == 1
        opa.mode("ok")
        assert call(gw, "GET", "/api/v1/agents", token(["readonly"]))[0] == 200
        assert call(gw, "POST", "/api/v1/tasks", token(["readonly"]))[0] == 403
        assert opa.state()["hits"] == 2
    finally:
        gw.stop()
        opa.stop()


def test_bundle_with_syntax_error_stops_startup(tmp_path: Path) -> None:
    bundle = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", bundle, ignore=shutil.ignore_patterns("*_test.rego"))
    (bundle / "trial.rego").write_text("package plant.gateway.trial\n\nexpired if {\n")
    gw = start_gateway({"PLANT_GUARDS": "auth,policy", "POLICY_DIR": str(bundle)},
                       backend_url="http://127.0.0.1:9", wait=False)
    try:
        gw.popen.wait(30)
        assert gw.popen.returncode not in (0, None)
        assert "POLICY_DIR: trial.rego:" in gw.output()
    finally:
        gw.kill()
