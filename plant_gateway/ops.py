"""Operational routes, apart from the request pipeline: health, readiness, metrics, API docs.

``/health`` touches nothing and names nothing; ``/ready`` reports each dependency, never a URL.
With an admin listener (``ADMIN_PORT``, the default) the ops surface is split: the admin
listener answers ``/health``, the detailed ``/ready`` and ``/metrics`` and nothing else (no
request ever reaches the pipeline there); the public one keeps ``/health``, the API docs and a
``/ready`` that says ready or not (no dependency names, computed at most once a second however
often it is asked), and answers ``/metrics`` with 404. ``ADMIN_PORT=0``: all on the public one.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from plant_gateway import metrics
from plant_gateway.backends.base import DependencyStatus
from plant_gateway.pipeline.ingress import trusted_hops
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.context import RequestContext
    from plant_gateway.deps import Dependencies
    from plant_gateway.forwarding import Proxy
    from plant_gateway.settings import Settings

# /api/health is the deployed gateway's second liveness path (the PP portal's proxy uses it)
PROBES = frozenset({"/health", "/api/health", "/ready", "/metrics"})
DOCS_PAGES = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})
OPS_PATHS = PROBES | DOCS_PAGES | {"/openapi.json"}
ADMIN_PATHS = frozenset({"/health", "/api/health", "/ready", "/metrics"})
# which ops routes a listener answers: the admin one, the public one beside an admin listener,
# or the public one alone (ADMIN_PORT=0: everything, as before the split)
ADMIN, PUBLIC, BOTH = "admin", "public", "both"
READY_CACHE_S = 1.0  # the public /ready's answer is reused this long
# the deployed body, less the backend URL it used to reveal (docs/MIGRATING.md, defects)
HEALTH_BODY = b'{"status":"healthy","service":"plant-gateway"}'

CHECK_TIMEOUT_S = 3.0
JSON = b"application/json"

# Interactive docs over /openapi.json, as the deployed gateway served them (Swagger UI and
# ReDoc from the jsDelivr CDN); the browser loads the scripts, the gateway serves two small pages.
SWAGGER_UI_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>Plant API - Docs</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>
SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui",
                 oauth2RedirectUrl: window.location.origin + "/docs/oauth2-redirect"});
</script></body></html>
"""
REDOC_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>Plant API - ReDoc</title></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js"></script>
</body></html>
"""


# Swagger UI's OAuth2 redirect target: hands the authorization response back to the opener.
OAUTH2_REDIRECT_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>OAuth2 redirect</title></head>
<body><script>
if (window.opener && window.opener.swaggerUIRedirectOauth2) {
  var redirect = window.opener.swaggerUIRedirectOauth2;
  var params = new URLSearchParams((location.hash || location.search).slice(1));
  redirect.callback({auth: redirect.auth, token: Object.fromEntries(params), isValid: true});
}
window.close();
</script></body></html>
"""


@dataclass(slots=True)
class OpsResponse:
    status: int
    body: bytes
    content_type: bytes = JSON
    problem: Problem | None = None


def is_ops_route(method: str, path: str) -> bool:
    return path in OPS_PATHS and method in ("GET", "HEAD")


async def _check(dep: Any) -> DependencyStatus:
    name = getattr(dep, "name", type(dep).__name__)
    try:
        status: DependencyStatus = await asyncio.wait_for(dep.check(), CHECK_TIMEOUT_S)
        return status
    except TimeoutError:
        return DependencyStatus(name, False, True, "check timed out")
    except Exception as exc:  # noqa: BLE001 - a broken check is a down dependency
        return DependencyStatus(name, False, True, f"check failed ({type(exc).__name__})")


async def readiness(deps: Dependencies, proxy: Proxy, guards: list[str]) -> OpsResponse:
    checks = [_check(d) for d in deps.all()]
    results = list(await asyncio.gather(*checks)) + await proxy.checks()
    ready = all(r.ok for r in results if r.required)
    doc = {
        "status": "ready" if ready else "not_ready",
        "dependencies": {r.name: r.as_dict() for r in results},
        "guards": guards,
    }
    return OpsResponse(200 if ready else 503, json.dumps(doc).encode())


class CachedReadiness:
    """The public ``/ready``: status only, the checks run at most once per ``READY_CACHE_S``.

    The public port is reachable from the internet; every ``/ready`` there would otherwise
    ping Redis and the database and call the backend. Concurrent askers share one run.
    """

    def __init__(self) -> None:
        self.answer: OpsResponse | None = None
        self.at = 0.0
        self.running: asyncio.Task[OpsResponse] | None = None

    async def get(self, deps: Dependencies, proxy: Proxy, guards: list[str]) -> OpsResponse:
        if self.answer is not None and time.monotonic() - self.at < READY_CACHE_S:
            return self.answer
        if self.running is None:
            self.running = asyncio.ensure_future(self._run(deps, proxy, guards))
            self.running.add_done_callback(self._done)
        return await asyncio.shield(self.running)

    @staticmethod
    async def _run(deps: Dependencies, proxy: Proxy, guards: list[str]) -> OpsResponse:
        detailed = await readiness(deps, proxy, guards)
        status = b"ready" if detailed.status == 200 else b"not_ready"
        return OpsResponse(detailed.status, b'{"status":"' + status + b'"}')

    def _done(self, task: asyncio.Task[OpsResponse]) -> None:
        self.running = None
        if not task.cancelled() and task.exception() is None:
            self.answer, self.at = task.result(), time.monotonic()


def external_url(ctx: RequestContext, settings: Settings) -> str:
    configured = getattr(settings, "public_url", None)
    if configured:
        return str(configured).rstrip("/")
    host = ctx.host or f"localhost:{settings.port}"
    if trusted_hops(settings, ctx.host) > 0 and ctx.headers.get("x-forwarded-host"):
        host = ctx.headers["x-forwarded-host"].split(",")[-1].strip()
    return f"{ctx.scheme}://{host}"


async def openapi(ctx: RequestContext, settings: Settings, proxy: Proxy) -> OpsResponse:
    upstream = proxy.upstream("production")
    bad = Problem(502, "bad-gateway", "the backend could not provide its OpenAPI document")
    if upstream.session is None:
        return OpsResponse(502, b"", problem=bad)
    try:
        timeout = aiohttp.ClientTimeout(total=settings.upstream_read_timeout_s)
        async with upstream.session.get(upstream.url("/openapi.json", ""), timeout=timeout) as resp:
            if resp.status != 200:
                return OpsResponse(502, b"", problem=bad)
            doc = json.loads(await resp.read())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return OpsResponse(502, b"", problem=bad)
    if not isinstance(doc, dict):
        return OpsResponse(502, b"", problem=bad)
    doc["servers"] = [{"url": external_url(ctx, settings)}]
    return OpsResponse(200, json.dumps(doc).encode())


async def handle(
    ctx: RequestContext, settings: Settings, deps: Dependencies, proxy: Proxy, guards: list[str],
    listener: str = BOTH, public_ready: CachedReadiness | None = None,
) -> OpsResponse:
    """The answer of one ops route on ``listener`` (ADMIN, PUBLIC or BOTH)."""
    if listener == ADMIN and (ctx.path not in ADMIN_PATHS or ctx.method not in ("GET", "HEAD")):
        detail = "the admin listener serves GET /health, /ready and /metrics only"
        return OpsResponse(404, b"", problem=Problem(404, "not-found", detail))
    if ctx.path in ("/health", "/api/health"):
        return OpsResponse(200, HEALTH_BODY)
    if ctx.path == "/ready":
        if listener == PUBLIC:
            return await (public_ready or CachedReadiness()).get(deps, proxy, guards)
        return await readiness(deps, proxy, guards)
    if ctx.path == "/metrics":
        if listener == PUBLIC:
            detail = "metrics are served on the admin listener, not on this port"
            return OpsResponse(404, b"", problem=Problem(404, "not-found", detail))
        return OpsResponse(200, metrics.render(), metrics.CONTENT_TYPE.encode())
    if ctx.path == "/openapi.json":
        return await openapi(ctx, settings, proxy)
    page = {"/docs/oauth2-redirect": OAUTH2_REDIRECT_HTML, "/redoc": REDOC_HTML}.get(
        ctx.path, SWAGGER_UI_HTML
    )
    return OpsResponse(200, page.encode(), b"text/html; charset=utf-8")


def cors_headers(settings: Settings, origin: str | None) -> list[tuple[bytes, bytes]]:
    """CORS headers for an allowed origin (echoed, never ``*``), on every response."""
    if not origin or origin not in settings.cors_origins:
        return []
    out = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
    if settings.cors_allow_credentials:
        out.append((b"access-control-allow-credentials", b"true"))
    out.append((b"access-control-expose-headers", b"X-Correlation-ID, X-Request-ID, Retry-After"))
    return out


def is_preflight(ctx: RequestContext) -> bool:
    return (
        ctx.method == "OPTIONS"
        and "origin" in ctx.headers
        and "access-control-request-method" in ctx.headers
    )


def preflight(ctx: RequestContext, settings: Settings) -> tuple[int, list[tuple[bytes, bytes]]]:
    origin = ctx.headers.get("origin")
    headers = cors_headers(settings, origin)
    if not headers:
        return 403, [(b"vary", b"Origin")]
    requested = ctx.headers.get("access-control-request-headers", "")
    headers += [
        (b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE, OPTIONS"),
        (b"access-control-allow-headers", (requested or "Authorization, Content-Type").encode()),
        (b"access-control-max-age", b"600"),
    ]
    return 204, headers
