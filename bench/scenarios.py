"""The scenarios of one benchmark run: how each server is started and what it is called.

Keys 1–6 follow issue 7; ``6b`` is Traefik, the second reference proxy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

from bench import configs
from bench.procs import Server, free_port
from bench.tools import VENV_BIN, Tools
from bench.traffic import DEV_SECRET

ALL_GUARDS_JSON = '["auth","rate_limit","policy","budget","tenant","audit"]'
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True)
class Services:
    """The real Redis and PostgreSQL of scenario 5 (the admin DSN may create databases)."""

    redis_url: str = REDIS_URL
    postgres_admin_dsn: str = POSTGRES_ADMIN_DSN

    def database_url(self, run_id: str) -> str:
        """The admin DSN with another database name; host, port, user and query (a socket
        directory in ``?host=``) kept as they are."""
        parts = urlsplit(self.postgres_admin_dsn)
        return urlunsplit(parts._replace(path=f"/plant_bench_{run_id}"))


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    # backend, nginx, envoy, traefik, gateway-forward, gateway-full-embedded, gateway-full-real
    kind: str
    tool: str | None  # external program it needs, None for the gateway

    @property
    def is_gateway(self) -> bool:
        return self.kind.startswith("gateway")


SCENARIOS = (
    Scenario("1", "backend direct (nginx static JSON)", "backend", None),
    Scenario("2", "nginx reverse proxy", "nginx", "nginx"),
    Scenario("3", "gateway, pure forwarding (guards off)", "gateway-forward", None),
    Scenario("4", "gateway, full chain, embedded backends", "gateway-full-embedded", None),
    Scenario("5", "gateway, full chain, Redis + PostgreSQL", "gateway-full-real", None),
    Scenario("6", "Envoy jwt_authn + local_ratelimit + router", "envoy", "envoy"),
    Scenario("6b", "Traefik reverse proxy", "traefik", "traefik"),
)
# Run order: pure forwarding first so its peak fixes the rate of the fixed-rate runs.
RUN_ORDER = ("1", "3", "2", "4", "5", "6", "6b")
FIXED_RATE_KEYS = ("2", "3", "4", "5", "6")


@dataclass
class Context:
    """What every scenario launcher needs: tools, directories, the backend, worker count."""

    tools: Tools
    workdir: Path
    backend_url: str
    workers: int
    run_id: str
    services: Services = Services()
    full_guards: str = ALL_GUARDS_JSON
    gateway_env: tuple[tuple[str, str], ...] = ()  # (name, value); "{backend}" = backend URL


def gateway_available() -> tuple[bool, str]:
    exe = VENV_BIN / "plant-gateway"
    if not exe.exists():
        return False, "plant-gateway is not installed in the venv"
    done = subprocess.run(  # noqa: S603
        [str(exe), "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return False, f"`plant-gateway serve` is not runnable yet ({tail[0][:120]})"
    return True, ""


def start_backend(tools: Tools, workdir: Path) -> tuple[Server, str, str]:
    """nginx serving a static JSON answer, or the asyncio fallback when nginx is missing."""
    port = free_port()
    prefix = workdir / "backend"
    prefix.mkdir(parents=True, exist_ok=True)
    nginx = tools.get("nginx")
    if nginx:
        conf = prefix / "nginx.conf"
        conf.write_text(configs.nginx_backend_conf(prefix, port))
        cmd = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
               "-g", "daemon off;"]
        note = "nginx 1 worker, `return 200` static JSON"
    else:
        cmd = [str(VENV_BIN / "python"), "-m", "bench.static_backend", "--port", str(port)]
        note = "asyncio static responder (nginx unavailable): may be the bottleneck"
    server = Server("backend", cmd, prefix / "server.log")
    server.start()
    server.wait_ready(f"http://127.0.0.1:{port}/", timeout=15)
    return server, f"http://127.0.0.1:{port}", note


def launch(scenario: Scenario, ctx: Context) -> tuple[Server | None, str, str]:
    """Start the server of a scenario; returns (server or None for 'backend', url, note)."""
    if scenario.kind == "backend":
        return None, ctx.backend_url, ""
    port = free_port()
    prefix = ctx.workdir / f"s{scenario.key}-w{ctx.workers}"
    prefix.mkdir(parents=True, exist_ok=True)
    os.chmod(prefix, 0o777)
    starter = _STARTERS[scenario.kind]
    server, note = starter(ctx, prefix, port)
    server.start()
    return server, f"http://127.0.0.1:{port}", note


def _backend_port(ctx: Context) -> int:
    return int(ctx.backend_url.rsplit(":", 1)[1])


def _nginx(ctx: Context, prefix: Path, port: int) -> tuple[Server, str]:
    conf = prefix / "nginx.conf"
    conf.write_text(configs.nginx_proxy_conf(prefix, port, _backend_port(ctx), ctx.workers))
    nginx = ctx.tools.paths["nginx"]
    cmd = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
           "-g", "daemon off;"]
    return Server("nginx", cmd, prefix / "server.log"), f"{ctx.workers} worker(s)"


def _envoy(ctx: Context, prefix: Path, port: int) -> tuple[Server, str]:
    conf = prefix / "envoy.json"
    conf.write_text(configs.envoy_conf(port, free_port(), _backend_port(ctx), DEV_SECRET))
    cmd = [ctx.tools.paths["envoy"], "-c", str(conf), "--concurrency", str(ctx.workers),
           "--log-level", "error", "--disable-hot-restart", "--base-id",
           str(int(uuid.uuid4().int % 10_000_000))]
    return Server("envoy", cmd, prefix / "server.log"), f"--concurrency {ctx.workers}"


def _traefik(ctx: Context, prefix: Path, port: int) -> tuple[Server, str]:
    dynamic = prefix / "dynamic.yml"
    dynamic.write_text(configs.traefik_dynamic(_backend_port(ctx)))
    cmd = [ctx.tools.paths["traefik"], *configs.traefik_args(port, dynamic)]
    server = Server("traefik", cmd, prefix / "server.log", env={"GOMAXPROCS": str(ctx.workers)})
    return server, f"GOMAXPROCS={ctx.workers}"


# --- the gateway -------------------------------------------------------------------------------

# Every tier far above what a run sends, except trial: one request per hour, so the
# "rate_limited" share of the traffic mix (trial tokens) is answered 429.
RATE_TIERS = (
    '{"trial":{"limit":1,"burst":0},'
    '"paid":{"limit":1000000000,"burst":1000000},'
    '"governor":{"limit":1000000000,"burst":1000000},'
    '"enterprise":{"limit":1000000000,"burst":1000000},'
    '"anonymous":{"limit":1000000000,"burst":1000000}}'
)


def _gateway_env(ctx: Context, prefix: Path, port: int) -> dict[str, str]:
    return {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ADMIN_PORT": str(free_port()),  # the default split, on a port no other run holds
        "WORKERS": str(ctx.workers),
        "ENVIRONMENT": "bench",
        "LOG_LEVEL": "WARNING",
        "PLANT_STATE_DIR": str(prefix / "state"),
        "PLANT_BACKEND_URL": ctx.backend_url,
        "JWT_SECRET": DEV_SECRET,
        "JWT_ALGORITHMS": '["HS256"]',
        "CUSTOMER_ENRICHMENT": "false",
        "RATE_TIERS": RATE_TIERS,
        "AGENT_DAILY_BUDGET_USD": "1000000000",
        "PLATFORM_MONTHLY_BUDGET_USD": "1000000000000",
        **{name: value.replace("{backend}", ctx.backend_url) for name, value in ctx.gateway_env},
    }


def _gateway_server(prefix: Path, env: dict[str, str | None]) -> Server:
    cmd = [str(VENV_BIN / "plant-gateway"), "serve"]
    # The embedded PostgreSQL lives under PLANT_STATE_DIR, a directory unique to this run.
    return Server("gateway", cmd, prefix / "server.log", env, helper_marker=str(prefix / "state"))


def _strip_service_env() -> dict[str, str | None]:
    """Make sure a developer's own REDIS_URL / DATABASE_URL do not leak into a scenario."""
    return {name: None for name in ("REDIS_URL", "REDIS_HOST", "DATABASE_URL", "OPA_SERVICE_URL",
                                  "OPA_URL", "LAUNCHDARKLY_SDK_KEY", "PLANT_CONFIG")
            if name in os.environ or name.lower() in os.environ}


def _gateway_forward(ctx: Context, prefix: Path, port: int) -> tuple[Server, str]:
    env: dict[str, str | None] = {
        **_strip_service_env(), **_gateway_env(ctx, prefix, port), "PLANT_GUARDS": "[]"}
    return _gateway_server(prefix, env), "PLANT_GUARDS=[]"


def _gateway_embedded(ctx: Context, prefix: Path, port: int) -> tuple[Server, str]:
    env: dict[str, str | None] = {
        **_strip_service_env(), **_gateway_env(ctx, prefix, port), "PLANT_GUARDS": ctx.full_guards}
    note = "in-process counters, in-process Rego, embedded PostgreSQL audit"
    return _gateway_server(prefix, env), note


def _gateway_real(ctx: Context, prefix: Path, port: int) -> tuple[Server, str]:
    env: dict[str, str | None] = {
        **_strip_service_env(),
        **_gateway_env(ctx, prefix, port),
        "PLANT_GUARDS": ctx.full_guards,
        "REDIS_URL": ctx.services.redis_url,
        "REDIS_KEY_PREFIX": f"bench:{ctx.run_id}:w{ctx.workers}:",
        "DATABASE_URL": ctx.services.database_url(ctx.run_id),
    }
    note = "real Redis and PostgreSQL (fresh database)"
    return _gateway_server(prefix, env), note


_STARTERS = {
    "nginx": _nginx,
    "envoy": _envoy,
    "traefik": _traefik,
    "gateway-forward": _gateway_forward,
    "gateway-full-embedded": _gateway_embedded,
    "gateway-full-real": _gateway_real,
}


# --- real services for scenario 5 ----------------------------------------------------------------

def prepare_real_services(services: Services, run_id: str) -> str | None:
    """Check Redis, create the run's database; return why scenario 5 cannot run, or None."""
    try:
        import redis

        redis.Redis.from_url(services.redis_url, socket_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "no Redis here"
        return f"no Redis at {_host(services.redis_url)} ({type(exc).__name__})"
    try:
        _admin_sql(services, f'CREATE DATABASE "plant_bench_{run_id}"')
    except Exception as exc:  # noqa: BLE001
        return (f"no PostgreSQL at {_host(services.postgres_admin_dsn)} "
                f"({type(exc).__name__}: {str(exc).strip()[:80]})")
    return _migrate(services, run_id)


def _host(url: str) -> str:
    """Where a URL points, without credentials: ``host:port``, or the socket directory."""
    parts = urlsplit(url)
    socket_dir = parse_qs(parts.query).get("host")
    return socket_dir[0] if socket_dir else (parts.netloc.rsplit("@", 1)[-1] or "localhost")


def _migrate(services: Services, run_id: str) -> str | None:
    """Apply the audit schema (Alembic, the gateway's own migrations) to the fresh database."""
    try:
        from plant_gateway import migrations

        migrations.upgrade(services.database_url(run_id))
    except Exception as exc:  # noqa: BLE001 - reported as the scenario's reason
        return f"audit schema migration failed: {type(exc).__name__}: {str(exc).strip()[:120]}"
    return None


def audit_rows(services: Services, run_id: str) -> int | None:
    """Rows the gateway wrote to the run's audit table (proof that scenario 5 audited)."""
    try:
        import psycopg2

        conn = psycopg2.connect(services.database_url(run_id), connect_timeout=3)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM gateway_audit_logs")
                row = cur.fetchone()
                return int(row[0]) if row else None
        finally:
            conn.close()
    except Exception:  # noqa: BLE001 - reported as unknown
        return None


def cleanup_real_services(services: Services, run_id: str) -> None:
    try:
        import redis

        client = redis.Redis.from_url(services.redis_url, socket_timeout=2)
        keys = list(client.scan_iter(match=f"bench:{run_id}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start:start + 500])
    except Exception:  # noqa: BLE001, S110 - best effort cleanup
        pass
    with contextlib.suppress(Exception):
        _admin_sql(services, f'DROP DATABASE IF EXISTS "plant_bench_{run_id}" WITH (FORCE)')


def _admin_sql(services: Services, statement: str) -> None:
    import psycopg2

    conn = psycopg2.connect(services.postgres_admin_dsn, connect_timeout=3)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
