"""``plant-gateway verify``: the post-deployment check of a running gateway, as a pass/fail table.

Health, readiness per dependency, a request through to the backend, a policy denial, audit rows.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from plant_gateway.cli.common import usage_fail

if TYPE_CHECKING:  # aiohttp is imported when verify runs: every other command starts faster
    import aiohttp

PROBLEM_TYPE = "application/problem+json"


@dataclass(slots=True)
class Check:
    name: str
    status: str  # pass | fail | skip
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass(slots=True)
class Options:
    url: str
    token: str | None = None
    deny_token: str | None = None
    jwt_secret: str | None = None
    issuer: str = "waooaw.com"
    path: str = "/api/v1/agents"
    deny_path: str = "/api/v1/platform_config"
    database_url: str | None = None
    timeout_s: float = 10.0
    audit_wait_s: float = 15.0
    admin_url: str | None = None  # the admin listener: the /ready that names every dependency


@dataclass(slots=True)
class Exchange:
    """One request the gateway answered (kept for the audit look-up)."""

    correlation_id: str
    status: int = 0
    problem: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


def mint(secret: str, issuer: str, roles: list[str], ttl_s: int = 300) -> str:
    """A short-lived HS256 access token for the checks (needs the gateway's JWT_SECRET)."""
    import jwt

    now = int(time.time())
    user_id = str(uuid.uuid4())
    claims = {
        "sub": user_id, "user_id": user_id, "email": "verify@plant-gateway.invalid",
        "roles": roles, "iss": issuer, "iat": now, "exp": now + ttl_s,
        "jti": uuid.uuid4().hex, "token_type": "access",
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def problem_kind(content_type: str, body: Any) -> str | None:
    """The gateway's problem kind (``permission-denied``...) or None for a non-problem answer."""
    if PROBLEM_TYPE not in content_type or not isinstance(body, dict):
        return None
    kind = str(body.get("type", "")).rstrip("/").rsplit("/", 1)[-1]
    return kind or str(body.get("title", "problem"))


class Unreachable(Exception):
    """No answer from the gateway; ``kind`` names the client's error (for the check's detail)."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(f"{type(exc).__name__} {exc}".strip())
        self.kind = type(exc).__name__


async def fetch(
    session: aiohttp.ClientSession, url: str, token: str | None = None
) -> Exchange:
    import aiohttp

    ex = Exchange(correlation_id=str(uuid.uuid4()))
    headers = {"X-Correlation-ID": ex.correlation_id, "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            ex.status = resp.status
            ex.headers = {k: v for k, v in resp.headers.items()}
            content_type = resp.headers.get("Content-Type", "")
            raw = await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Unreachable(exc) from exc
    try:
        ex.body = json.loads(raw) if raw else None
    except ValueError:
        ex.body = raw[:200].decode(errors="replace")
    ex.problem = problem_kind(content_type, ex.body)
    return ex


def describe(ex: Exchange) -> str:
    text = f"HTTP {ex.status}"
    if ex.problem:
        text += f" {ex.problem}"
        if isinstance(ex.body, dict) and ex.body.get("detail"):
            text += f": {ex.body['detail']}"
    return text


# --- the checks -----------------------------------------------------------------------------


async def check_health(session: aiohttp.ClientSession, opts: Options) -> list[Check]:
    try:
        ex = await fetch(session, opts.url + "/health")
    except Unreachable as exc:
        return [Check("health", "fail", f"unreachable: {exc}")]
    ok = ex.status == 200
    return [Check("health", "pass" if ok else "fail", describe(ex))]


async def check_ready(session: aiohttp.ClientSession, opts: Options) -> list[Check]:
    try:
        ex = await fetch(session, (opts.admin_url or opts.url) + "/ready")
    except Unreachable as exc:
        return [Check("ready", "fail", f"unreachable: {exc.kind}")]
    doc = ex.body if isinstance(ex.body, dict) else {}
    deps = doc.get("dependencies") or {}
    guards = doc.get("guards")
    down = sorted(n for n, d in deps.items() if d.get("status") != "up" and d.get("required", 1))
    summary = describe(ex) + (f"; down: {', '.join(down)}" if down else "")
    summary += f"; guards: {', '.join(guards)}" if guards else ""
    checks = [Check("ready", "pass" if ex.status == 200 else "fail", summary)]
    for name, dep in sorted(deps.items()):
        up = dep.get("status") == "up"
        required = dep.get("required", True)
        detail = dep.get("detail", "") or ("up" if up else "down")
        if dep.get("latency_ms") is not None:
            detail += f" ({dep['latency_ms']} ms)"
        status = "pass" if up else ("fail" if required else "skip")
        if not up and not required:
            detail = "down (optional): " + detail
        checks.append(Check(f"ready: {name}", status, detail))
    return checks


async def check_passthrough(
    session: aiohttp.ClientSession, opts: Options, token: str | None
) -> tuple[list[Check], Exchange | None]:
    name = f"pass-through GET {opts.path}"
    if token is None:
        return [Check(name, "fail", "needs --token or --jwt-secret")], None
    try:
        ex = await fetch(session, opts.url + opts.path, token)
    except Unreachable as exc:
        return [Check(name, "fail", f"unreachable: {exc.kind}")], None
    # The backend answered (not a problem produced by the gateway itself).
    reached = ex.problem is None and ex.status < 500
    detail = describe(ex)
    target = ex.headers.get("X-Target-Backend")
    if target:
        detail += f"; X-Target-Backend: {target}"
    if reached and ex.headers.get("X-Correlation-ID", "").lower() != ex.correlation_id:
        return [Check(name, "fail", detail + "; X-Correlation-ID not echoed")], ex
    return [Check(name, "pass" if reached else "fail", detail)], ex


async def check_deny(
    session: aiohttp.ClientSession, opts: Options, token: str | None
) -> tuple[list[Check], Exchange | None]:
    name = f"policy deny GET {opts.deny_path}"
    if token is None:
        return [Check(name, "fail", "needs --deny-token or --jwt-secret")], None
    try:
        ex = await fetch(session, opts.url + opts.deny_path, token)
    except Unreachable as exc:
        return [Check(name, "fail", f"unreachable: {exc.kind}")], None
    ok = ex.status == 403 and ex.problem == "permission-denied"
    detail = describe(ex)
    if not ok:
        detail = f"expected HTTP 403 permission-denied, got {detail}"
    return [Check(name, "pass" if ok else "fail", detail)], ex


async def find_audit_rows(database_url: str, ids: list[str], wait_s: float) -> dict[str, int]:
    """correlation_id -> status_code of the audit rows found, read as an RLS admin."""
    import asyncpg

    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        found: dict[str, int] = {}
        deadline = time.monotonic() + wait_s
        while True:
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.is_admin', 'true', true)")
                rows = await conn.fetch(
                    "SELECT correlation_id::text AS cid, status_code FROM gateway_audit_logs "
                    "WHERE correlation_id = ANY($1::uuid[])", ids,
                )
            found = {r["cid"]: r["status_code"] for r in rows}
            if len(found) == len(set(ids)) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.25)
    finally:
        await conn.close()


async def check_audit(opts: Options, exchanges: dict[str, Exchange | None]) -> list[Check]:
    wanted = {label: ex for label, ex in exchanges.items() if ex is not None}
    if not opts.database_url:
        return [Check("audit row", "skip", "no --database-url given")]
    if not wanted:
        return [Check("audit row", "fail", "no request reached the gateway to look up")]
    try:
        found = await find_audit_rows(
            opts.database_url, [ex.correlation_id for ex in wanted.values()], opts.audit_wait_s
        )
    except Exception as exc:  # noqa: BLE001 - any database failure is a failed check
        return [Check("audit row", "fail", f"database query failed: {type(exc).__name__}: {exc}")]
    checks = []
    for label, ex in wanted.items():
        status = found.get(ex.correlation_id)
        if status is None:
            checks.append(Check(f"audit row ({label})", "fail",
                                f"no row for correlation id {ex.correlation_id}"))
        elif status != ex.status:
            checks.append(Check(f"audit row ({label})", "fail",
                                f"row has status {status}, response was {ex.status}"))
        else:
            checks.append(Check(f"audit row ({label})", "pass",
                                f"correlation id {ex.correlation_id}, status {status}"))
    return checks


async def run_checks(opts: Options) -> list[Check]:
    token, deny_token = opts.token, opts.deny_token
    if opts.jwt_secret:
        token = token or mint(opts.jwt_secret, opts.issuer, ["admin"])
        deny_token = deny_token or mint(opts.jwt_secret, opts.issuer, ["viewer"])
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=opts.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        checks = await check_health(session, opts)
        checks += await check_ready(session, opts)
        passed, pass_ex = await check_passthrough(session, opts, token)
        denied, deny_ex = await check_deny(session, opts, deny_token)
    checks += passed + denied
    checks += await check_audit(opts, {"pass-through": pass_ex, "deny": deny_ex})
    return checks


# --- output -----------------------------------------------------------------------------------


def table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'CHECK'.ljust(width)}  RESULT  DETAIL"]
    lines += [f"{c.name.ljust(width)}  {c.status.upper().ljust(6)}  {c.detail}" for c in checks]
    lines.append(summary(checks))
    return "\n".join(lines)


def summary(checks: list[Check]) -> str:
    """``all N checks passed``, or the passed / skipped / failed counts (a skip is no pass)."""
    counts = {status: sum(c.status == status for c in checks) for status in ("pass", "skip")}
    failed = sum(c.failed for c in checks)
    if not failed and not counts["skip"]:
        return f"all {len(checks)} checks passed"
    parts = [f"{counts['pass']} passed"]
    parts += [f"{counts['skip']} skipped"] if counts["skip"] else []
    parts += [f"{failed} failed"] if failed else []
    return ", ".join(parts)


def verify(
    url: Annotated[str, typer.Option("--url", help="gateway base URL, e.g. https://plant.waooaw.com")],
    token: Annotated[str | None, typer.Option(
        "--token", envvar="VERIFY_TOKEN",
        help="access token allowed to GET --path (pass-through check)")] = None,
    deny_token: Annotated[str | None, typer.Option(
        "--deny-token", envvar="VERIFY_DENY_TOKEN",
        help="low-privilege token that policy must deny on --deny-path")] = None,
    jwt_secret: Annotated[str | None, typer.Option(
        "--jwt-secret", envvar="VERIFY_JWT_SECRET",
        help="the gateway's HS256 JWT_SECRET: mint missing tokens (admin / viewer)")] = None,
    issuer: Annotated[str, typer.Option(help="issuer of minted tokens")] = "waooaw.com",
    path: Annotated[str, typer.Option(help="path that must reach the backend")] = "/api/v1/agents",
    deny_path: Annotated[str, typer.Option(
        help="path the low-privilege token must be refused (403)")] = "/api/v1/platform_config",
    database_url: Annotated[str | None, typer.Option(
        "--database-url", envvar="VERIFY_DATABASE_URL",
        help="PostgreSQL URL: check the audit rows of both requests")] = None,
    timeout: Annotated[float, typer.Option(help="per-request timeout, seconds")] = 10.0,
    audit_wait: Annotated[float, typer.Option(help="how long to wait for audit rows")] = 15.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    admin_url: Annotated[str | None, typer.Option(
        "--admin-url", help="the admin listener (ADMIN_PORT): read /ready there, with a line "
        "per dependency; default --url, whose /ready says ready or not")] = None,
) -> None:
    """Check a deployed gateway end to end; exit 1 if any check fails."""
    _check_urls(url, database_url)
    if admin_url:
        _check_urls(admin_url, None, "--admin-url")
    opts = Options(
        url=url.rstrip("/"), token=token, deny_token=deny_token, jwt_secret=jwt_secret,
        issuer=issuer, path=path, deny_path=deny_path, database_url=database_url,
        timeout_s=timeout, audit_wait_s=audit_wait,
        admin_url=admin_url.rstrip("/") if admin_url else None,
    )
    checks = asyncio.run(run_checks(opts))
    ok = not any(c.failed for c in checks)
    if as_json:
        doc = {"url": opts.url, "ok": ok, "checks": [asdict(c) for c in checks]}
        typer.echo(json.dumps(doc, indent=2))
    else:
        typer.echo(table(checks))
    raise typer.Exit(0 if ok else 1)


def _check_urls(url: str, database_url: str | None, option: str = "--url") -> None:
    from urllib.parse import urlsplit

    from plant_gateway.settings import postgres_dsn

    parts = urlsplit(url)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        usage_fail(f"{option}: {url!r} is not an http:// or https:// URL with a host")
    if database_url:
        try:
            postgres_dsn(database_url)
        except ValueError as exc:
            usage_fail(f"--database-url: {exc}")


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
