"""The admin listener (ADMIN_PORT) and the per-route metrics, on a real ``plant-gateway serve``.

Operators scrape ``/metrics`` and read the detailed ``/ready`` on the admin port; the public
port keeps ``/health`` and a readiness answer without dependency names, and never serves
``/metrics``. The route label of a series is a ``METRICS_ROUTES`` pattern, never the raw path.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.processes import JWT_SECRET, Proc, free_port, mint_token, start_gateway

ONLY_AUTH: dict[str, str | None] = {"PLANT_GUARDS": "auth", "CUSTOMER_ENRICHMENT": "false",
             "METRICS_ROUTES": "/api/v1/agents/*,/api/v1/*"}


def fetch(url: str, token: str | None = None) -> tuple[int, str, Any]:
    """(status, content type, body: JSON when it is JSON)."""
    request = urllib.request.Request(url)  # noqa: S310 - loopback test servers
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            status, ctype, raw = resp.status, resp.headers["content-type"], resp.read()
    except urllib.error.HTTPError as exc:
        status, ctype, raw = exc.code, exc.headers["content-type"], exc.read()
    body: Any = raw.decode()
    if "json" in (ctype or ""):
        body = json.loads(raw)
    return status, ctype or "", body


def samples(admin_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, _, text = fetch(admin_url + "/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def gateway(backend: Proc) -> Iterator[Proc]:
    proc = start_gateway(ONLY_AUTH, backend=backend)
    yield proc
    proc.stop()


def test_public_listener_keeps_health_and_a_bare_readiness(gateway: Proc) -> None:
    assert fetch(gateway.url + "/health")[:1] == (200,)
    status, _, body = fetch(gateway.url + "/ready")
    assert (status, body) == (200, {"status": "ready"})  # no dependency, guard or URL
    status, ctype, body = fetch(gateway.url + "/metrics")
    assert status == 404 and ctype == "application/problem+json"
    assert body["type"].endswith("/errors/not-found")


def test_admin_listener_serves_metrics_and_the_detailed_readiness(gateway: Proc) -> None:
    assert gateway.admin_url != gateway.url
    status, _, ready = fetch(gateway.admin_url + "/ready")
    assert status == 200 and ready["guards"] == ["auth"]
    assert ready["dependencies"]["upstream_production"]["status"] == "up"
    status, ctype, text = fetch(gateway.admin_url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert "plant_gateway_build_info" in text


def test_admin_listener_never_forwards_anything(gateway: Proc) -> None:
    token = mint_token(roles=["admin"])
    assert fetch(gateway.url + "/api/v1/agents/1", token)[0] == 200  # forwarded on the public one
    status, ctype, body = fetch(gateway.admin_url + "/api/v1/agents/1", token)
    assert status == 404 and ctype == "application/problem+json"
    assert "backend" not in body  # the gateway's own answer, not the demo backend's
    assert fetch(gateway.admin_url + "/openapi.json")[0] == 404  # API docs: public only


def test_latency_is_split_per_route_pattern_and_refusals_counted_by_guard(gateway: Proc) -> None:
    token = mint_token(roles=["admin"])
    before = samples(gateway.admin_url)
    for path in ("/api/v1/agents/42", "/api/v1/agents/43/runs", "/api/v1/tasks/7"):
        assert fetch(gateway.url + path, token)[0] == 200
    assert fetch(gateway.url + "/api/v1/agents/44")[0] == 401  # no token: auth refuses
    assert fetch(gateway.url + "/somewhere/else", token)[0] == 200
    after = samples(gateway.admin_url)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    agents, api = "/api/v1/agents/*", "/api/v1/*"  # first listed pattern wins
    up = "plant_gateway_upstream_duration_seconds_count"
    assert grew(up, route=agents, upstream="production") == 2
    assert grew(up, route=api, upstream="production") == 1
    assert grew(up, route="other", upstream="production") == 1
    assert grew("plant_gateway_overhead_seconds_count", route=agents) == 3  # the 401 too
    assert grew("plant_gateway_request_duration_seconds_count", route=agents) == 3
    assert grew("plant_gateway_requests_total", route=agents, method="GET", status="401") == 1
    assert grew("plant_gateway_denials_total", guard="auth", kind="unauthorized") == 1
    routes = {dict(labels).get("route") for _, labels in after} - {None}
    assert routes <= {agents, api, "other", "/health", "/ready", "/metrics", "/openapi.json"}


def test_with_admin_port_0_the_ops_surface_stays_on_the_public_port(backend: Proc) -> None:
    proc = start_gateway({**ONLY_AUTH, "ADMIN_PORT": "0"}, backend=backend)
    try:
        assert proc.admin_url == proc.url
        status, _, ready = fetch(proc.url + "/ready")
        assert status == 200 and ready["guards"] == ["auth"]
        status, _, text = fetch(proc.url + "/metrics")
        assert status == 200 and "plant_gateway_requests_total" in text
    finally:
        proc.stop()


def serve(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HOST": "127.0.0.1",
            "PLANT_BACKEND_URL": "http://127.0.0.1:9", "JWT_SECRET": JWT_SECRET,
            "PLANT_STATE_DIR": str(tmp_path / "state"), "PLANT_GUARDS": "auth",
            "LOG_LEVEL": "WARNING"}
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "plant_gateway.cli", "serve"], env={**base, **env},
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_a_taken_admin_port_is_one_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        done = serve({"PORT": str(free_port()), "ADMIN_PORT": str(taken)}, tmp_path)
    records = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()]
    assert done.returncode == 1
    assert [r["message"] for r in records if r["severity"] == "ERROR"] == [
        f"ADMIN_PORT: cannot listen on 127.0.0.1:{taken}: address already in use"
    ]


def test_admin_port_equal_to_port_is_a_config_error(tmp_path: Path) -> None:
    port = str(free_port())
    done = serve({"PORT": port, "ADMIN_PORT": port}, tmp_path)
    assert done.returncode == 2
    assert f"ADMIN_PORT: {port} is also PORT" in done.stderr
    assert "Traceback" not in done.stderr
