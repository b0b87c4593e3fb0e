"""The gateway's metric names and labels follow Prometheus' conventions, and stay bounded.

Dashboards and alert rules are written against these names (deploy/grafana, deploy/prometheus);
a route label must never carry a client's path, or one scanner would create series without end.
"""

from __future__ import annotations

import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from plant_gateway import metrics, ops
from plant_gateway.audit import metrics as audit_metrics  # noqa: F401 - registers the series
from plant_gateway.settings import DEFAULT_METRICS_ROUTES, Settings, SettingsError, load_settings

BASE_UNITS = ("_seconds", "_bytes", "_ratio", "_rows")


def families() -> dict[str, str]:
    """name -> type of every family /metrics exposes (labelled ones included, even unused)."""
    return {f.name: f.type for f in text_string_to_metric_families(metrics.render().decode())}


def test_every_family_has_the_prefix_and_a_conventional_suffix() -> None:
    found = families()
    assert len(found) >= 30
    for name, kind in found.items():
        assert name.startswith("plant_gateway_"), name
        if kind == "histogram":
            assert name.endswith(("_seconds",)), name  # durations in the base unit
        if kind == "gauge":
            assert not name.endswith("_total"), name  # _total is for counters only
        assert "_latency" not in name and "_ms" not in name, name


def test_counters_are_exposed_with_total() -> None:
    text = metrics.render().decode()
    counters = [n for n, kind in families().items() if kind == "counter"]
    assert "plant_gateway_requests" in counters and "plant_gateway_denials" in counters
    for name in counters:
        assert f"# TYPE {name}_total counter" in text or f"# TYPE {name} counter" in text, name


def test_the_audit_pipeline_set_is_complete() -> None:
    names = set(families())
    expected = {
        "plant_gateway_audit_queue_depth", "plant_gateway_audit_queue_capacity_rows",
        "plant_gateway_audit_spool_pending_rows", "plant_gateway_audit_spool_bytes",
        "plant_gateway_audit_spool_capacity_bytes", "plant_gateway_audit_rows_written",
        "plant_gateway_audit_rows_spooled", "plant_gateway_audit_rows_replayed",
        "plant_gateway_audit_rows_lost", "plant_gateway_audit_rows_dead_lettered",
        "plant_gateway_audit_database_up", "plant_gateway_audit_spool_writable",
        "plant_gateway_audit_refusing", "plant_gateway_audit_writer_restarts",
        "plant_gateway_audit_write_duration_seconds",
    }
    assert expected <= names, expected - names


def test_route_label_is_the_first_matching_pattern_never_the_path() -> None:
    label = metrics.RouteLabels(["/api/v1/agents/*", "/api/v1/hired-agents/*/finalize",
                                 "/api/v1/*"], fixed=ops.OPS_PATHS)
    assert label("/api/v1/agents/42") == "/api/v1/agents/*"
    assert label("/api/v1/agents") == "/api/v1/agents/*"  # "/a/*" also matches "/a"
    assert label("/api/v1/hired-agents/h1/finalize") == "/api/v1/hired-agents/*/finalize"
    assert label("/api/v1/hired-agents/h1") == "/api/v1/*"
    assert label("/metrics") == "/metrics"
    assert label("/metrics/x") == "other"
    assert label("/etc/passwd") == "other"
    assert label("/") == "other"


def test_a_flood_of_random_paths_adds_no_label() -> None:
    patterns = ["/api/v1/agents/*", "/api/v1/*"]
    label = metrics.RouteLabels(patterns, fixed=ops.OPS_PATHS)
    seen = {label(f"/{uuid.uuid4().hex}/{uuid.uuid4().hex}") for _ in range(2000)}
    seen |= {label(f"/api/v1/{uuid.uuid4().hex}") for _ in range(2000)}
    assert seen == {"other", "/api/v1/*"}
    assert len(label.cache) <= 4096  # the path cache is bounded too


def test_default_metrics_routes_cover_the_backend_api() -> None:
    label = metrics.RouteLabels(DEFAULT_METRICS_ROUTES, fixed=ops.OPS_PATHS)
    assert label("/api/v1/hired-agents/h1/finalize") == "/api/v1/hired-agents/*"
    assert label("/api/v1/auth/login") == "/api/v1/auth/*"
    assert label("/api/v1/payments/razorpay/order") == "/api/v1/payments/*"
    assert label("/health") == "/health"


def test_methods_outside_the_standard_set_share_one_label() -> None:
    assert metrics.method_label("GET") == "GET"
    assert metrics.method_label("PROPFIND") == "OTHER"


@pytest.mark.parametrize("value", ["GET /api/*", "!/api/v1/x", "api/v1", "/a b"])
def test_a_metrics_route_with_methods_or_bad_syntax_is_refused(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLANT_BACKEND_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("JWT_SECRET", "x" * 32)
    monkeypatch.setenv("METRICS_ROUTES", value)
    with pytest.raises(SettingsError, match="METRICS_ROUTES"):
        load_settings()


def test_admin_port_defaults_to_a_loopback_listener_apart_from_port() -> None:
    settings = Settings(plant_backend_url="http://127.0.0.1:9")
    assert (settings.admin_port, settings.admin_host) == (8081, "127.0.0.1")
    assert settings.admin_port != settings.port
