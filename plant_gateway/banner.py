"""The one start-up line: where the gateway listens, how many workers, which guards are on and
which backends are real services, in-process or embedded (and never a password or key)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from plant_gateway.settings import Settings


def where(url: str) -> str:
    """A service URL reduced to scheme, host, port and path: no user, password or query."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def counters(settings: Settings) -> str:
    url = settings.effective_redis_url
    if not url:
        return "in-process"
    if embedded_redis(url, settings.state_dir):
        return "embedded redis-server (shared by the workers)"
    kind = "Redis Cluster" if settings.redis_cluster else "Redis"
    return f"{kind} {where(url)}"


def embedded_redis(url: str, state_dir: Path) -> bool:
    """The unix socket ``serve`` starts for its workers (``counters.start_embedded_redis``)."""
    if not url.startswith("unix://"):
        return False
    sock = Path(urlsplit(url).path)
    return sock.name.startswith("counters-") and sock.parent == Path(state_dir).resolve()


def policy(settings: Settings, engine: Any) -> str:
    if not settings.guard_on("policy"):
        return "off"
    if settings.opa_service_url:
        return f"remote OPA {where(settings.opa_service_url)}"
    revision = getattr(engine, "revision", None)
    return f"in-process Rego (bundle {revision})" if revision else "in-process Rego"


def audit(settings: Settings) -> str:
    if not settings.guard_on("audit"):
        return "off"
    if settings.database_url is not None:
        return f"PostgreSQL {where(settings.database_url.get_secret_value())}"
    return f"embedded PostgreSQL ({Path(settings.state_dir) / 'pgdata'})"


def audit_spool(settings: Settings) -> str:
    """Where audit rows wait during a database outage (README → Audit durability)."""
    from plant_gateway.audit.spool_redis import enabled

    if not settings.guard_on("audit"):
        return "off"
    url = enabled(settings)
    return f"Redis {where(url)}, then disk" if url else "disk"


def flags(settings: Settings) -> str:
    if settings.launchdarkly_sdk_key is not None:
        return "LaunchDarkly"
    if settings.flags_file is not None:
        return f"file {settings.flags_file}"
    return "defaults (every guard flag on)"


def keys(settings: Settings) -> str:
    if not settings.guard_on("auth"):
        return "off"
    found = [name for name, value in (
        ("JWT_SECRET", settings.jwt_secret), ("JWT_PUBLIC_KEY", settings.jwt_public_key),
    ) if value]
    if settings.jwt_jwks_url:
        found.append(f"JWKS {where(settings.jwt_jwks_url)}")
    return ", ".join(found)


def tracing(settings: Settings) -> str:
    if settings.trace_sample_rate <= 0:
        return "off"
    endpoint = where(settings.otel_exporter_otlp_endpoint)
    return f"OTLP {endpoint}, sample rate {settings.trace_sample_rate:g}"


def describe(settings: Settings, guards: list[str], policy_engine: Any = None) -> dict[str, Any]:
    """The structured fields of the start-up line."""
    return {
        "port": settings.port,
        "host": settings.host,
        "workers": settings.workers,
        "guards": guards,
        "backends": {
            "counters": counters(settings),
            "policy": policy(settings, policy_engine),
            "audit": audit(settings),
            "audit_spool": audit_spool(settings),
            "flags": flags(settings),
            "verification": keys(settings),  # never "key"/"jwt": redacted names
        },
        "upstreams": {"production": where(settings.plant_backend_url),
                      "sandbox": where(settings.sandbox_url)},
        "tracing": tracing(settings),
        "request_log_sample_rate": settings.request_log_sample_rate,
        "gateway_type": settings.gateway_type,
        "environment": settings.environment,
    }


def message(fields: dict[str, Any]) -> str:
    backends = "; ".join(f"{k}: {v}" for k, v in fields["backends"].items())
    workers = fields["workers"]
    return (
        f"gateway started on {fields['host']}:{fields['port']} ({workers} worker"
        f"{'s' if workers != 1 else ''}); guards: {', '.join(fields['guards']) or 'none'}; "
        f"{backends}; tracing: {fields['tracing']}"
    )
