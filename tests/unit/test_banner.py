"""The start-up line says which backends are embedded, in-process or real, never a password."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plant_gateway import banner
from plant_gateway.settings import Settings


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"plant_backend_url": "http://backend:8080", "jwt_secret": "s" * 40}
    return Settings(**{**base, **overrides})


def test_embedded_defaults() -> None:
    fields = banner.describe(settings(port=8123, workers=1), ["auth", "audit"])
    assert fields["port"] == 8123 and fields["workers"] == 1
    assert fields["backends"]["counters"] == "in-process"
    assert fields["backends"]["audit"].startswith("embedded PostgreSQL (")
    assert fields["backends"]["audit_spool"] == "disk"
    assert fields["backends"]["policy"] == "in-process Rego"
    assert fields["tracing"] == "off"
    message = banner.message(fields)
    assert message.startswith("gateway started on 0.0.0.0:8123 (1 worker); guards: auth, audit")


def test_real_services_are_named_without_credentials(tmp_path: Path) -> None:
    fields = banner.describe(settings(
        redis_url="redis://:redis-pass@cache.internal:6380/0",
        database_url="postgresql://writer:db-pass@db.internal:5432/plant",
        opa_service_url="http://opa.internal:8181", workers=4, state_dir=tmp_path,
        trace_sample_rate=0.05, otel_exporter_otlp_endpoint="http://collector:4318",
    ), ["auth"])
    backends = fields["backends"]
    assert backends["counters"] == "Redis redis://cache.internal:6380/0"
    assert backends["audit"] == "PostgreSQL postgresql://db.internal:5432/plant"
    assert backends["audit_spool"] == "Redis redis://cache.internal:6380/0, then disk"
    assert backends["policy"] == "remote OPA http://opa.internal:8181"
    assert fields["tracing"] == "OTLP http://collector:4318, sample rate 0.05"
    assert "pass" not in repr(fields) and "(4 workers)" in banner.message(fields)


def test_the_workers_shared_redis_is_embedded(tmp_path: Path) -> None:
    sock = tmp_path.resolve() / "counters-123.sock"
    fields = banner.describe(settings(redis_url=f"unix://{sock}", state_dir=tmp_path), [])
    assert fields["backends"]["counters"] == "embedded redis-server (shared by the workers)"
    assert fields["backends"]["audit_spool"] == "disk"  # the embedded Redis dies with it
