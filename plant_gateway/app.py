"""The raw ASGI application: ingress, ops routes, the step pipeline, forwarding, audit.

One request = one RequestContext; the first Problem is the answer; the audit sees every outcome.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from plant_gateway import banner, metrics, ops, shutdown_watchdog
from plant_gateway.audit import AuditOff, build_recorder
from plant_gateway.context import RequestContext
from plant_gateway.deps import Dependencies, close_all, create_dependencies, start_all
from plant_gateway.forwarding import ClientLink, Proxy, ResponseStarted
from plant_gateway.http_protocol import ClientLimits
from plant_gateway.logs import request_var
from plant_gateway.pipeline.counter_batch import flush_on_refusal
from plant_gateway.pipeline.ingress import BodySource, context_from_scope
from plant_gateway.pipeline.registry import PLUMBING, build_pipeline
from plant_gateway.pipeline.step import Step
from plant_gateway.problems import Problem
from plant_gateway.request_log import RequestLog
from plant_gateway.runtime import tune_gc
from plant_gateway.settings import Settings, SettingsError
from plant_gateway.shutdown_watchdog import ShutdownWatchdog

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
log = logging.getLogger("plant_gateway.app")
_HEAD_MESSAGES = frozenset({"http.response.start", "websocket.accept", "websocket.close"})


def startup_failure(exc: Exception) -> str:
    """The one line uvicorn logs when start-up fails; a traceback only for a bug.

    A bad setting or a dependency that cannot start is named by its message alone.
    """
    from subprocess import SubprocessError

    from plant_gateway.backends.base import DependencyError

    if isinstance(exc, SettingsError):
        return f"config error: {exc}"
    # an outage, a port or file that is not there, an embedded server that did not start
    if isinstance(exc, DependencyError | OSError | RuntimeError | SubprocessError):
        return f"start-up failed: {type(exc).__name__}: {exc}"
    log.exception("start-up failed")
    return f"start-up failed: {type(exc).__name__}: {exc}"


class ResponseTracker:
    """Wraps ``send`` to know whether the response head already left, and the body bytes sent."""

    __slots__ = ("send", "started", "sent")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False
        self.sent = 0

    def __call__(self, message: MutableMapping[str, Any]) -> Awaitable[None]:
        # not a coroutine itself: hands back the server's awaitable (one frame less per message)
        kind = message["type"]
        if kind == "http.response.body":
            self.sent += len(message.get("body", b""))
        elif kind in _HEAD_MESSAGES:
            self.started = True
        return self.send(message)


class GatewayApp:
    def __init__(
        self, settings: Settings, deps: Dependencies | None = None, tune_runtime: bool = False
    ) -> None:
        self.settings = settings
        self.tune_runtime = tune_runtime  # process-wide GC tuning: only when serving
        self.deps = deps
        self.pipeline: list[Step] = []
        self.steps: list[tuple[Step, bool]] = []  # (step, has an ``after`` hook), built at start-up
        self.max_body = settings.max_body_bytes
        self.body_timeout = settings.request_body_timeout_s
        self.client_limits = ClientLimits.from_settings(settings)  # read by http_protocol
        self.proxy = Proxy(settings)
        self.forward = self.proxy.forward  # in a CLIENT span when tracing is on
        self.audit: Any = AuditOff()
        self.audit_sample_cap = 0  # request body bytes kept for the audit row
        self.guards: list[str] = []
        self.request_log = RequestLog(settings)
        self.tracing: Any = None  # plant_gateway.tracing.Tracing when TRACE_SAMPLE_RATE > 0
        # the admin listener's port (serve binds it beside PORT); 0: the ops surface on PORT
        self.admin_port = settings.admin_port
        self.public_ops = ops.PUBLIC if settings.admin_port else ops.BOTH
        self.public_ready = ops.CachedReadiness()
        self.route_label = metrics.RouteLabels(settings.metrics_routes, ops.OPS_PATHS)

    # --- lifespan ------------------------------------------------------------------------
    async def startup(self) -> None:
        if self.deps is None:
            self.deps = await create_dependencies(self.settings)
        await start_all(self.deps)
        await self.proxy.start()
        try:
            self.tracing = build_tracing(self.settings)
            if self.tracing is not None:
                self.deps.policy = self.tracing.wrap_policy(self.deps.policy)
            self.pipeline = build_pipeline(self.settings, self.deps)
        except Exception:
            await self.shutdown()
            raise
        self.steps = [(s, hasattr(s, "after")) for s in self.pipeline]
        if self.tracing is not None:
            self.steps = [(self.tracing.wrap_step(s, self.deps.counters), a)
                          for s, a in self.steps]
            self.forward = self.tracing.wrap_forward(self.proxy.forward, self.proxy)
        self.audit = build_recorder(self.settings, self.deps)
        if not isinstance(self.audit, AuditOff):
            self.audit_sample_cap = self.settings.audit_body_cap_bytes
        self.guards = [s.name for s in self.pipeline if s.name not in PLUMBING]
        if not isinstance(self.audit, AuditOff):
            self.guards.append("audit")
        for guard in self.settings.guards:
            metrics.GUARD_ACTIVE.labels(guard).set(1 if guard in self.guards else 0)
        metrics.start_sharing()  # serve --workers N > 1: /metrics sums every worker
        fields = banner.describe(self.settings, self.guards, self.deps.policy)
        log.info(banner.message(fields), extra={"event": "started", **fields})
        missing = [g for g in self.settings.guards if g not in self.guards]
        if missing:
            log.warning("guards configured on but not active", extra={"guards": missing})
        if not isinstance(self.audit, AuditOff) and self.settings.audit_chain_key is None:
            log.warning("audit: AUDIT_CHAIN_KEY is not set: chain checkpoints are unsigned, "
                        "so an edit of a chain's last rows that also rewrites its checkpoints "
                        "cannot be detected by `plant-gateway audit verify`")
        if self.tune_runtime:
            tune_gc()  # in every served worker: the start-up heap is complete now

    async def shutdown(self) -> None:
        watchdog = ShutdownWatchdog(self.settings.audit_flush_s + shutdown_watchdog.SLACK_S)
        watchdog.start()
        try:
            await self.proxy.close()
            if self.deps is not None:
                await close_all(self.deps)
            if self.tracing is not None:
                await asyncio.to_thread(self.tracing.shutdown)  # exports what is queued
        finally:
            await metrics.stop_sharing()  # last: the audit flush above still counts
            watchdog.stop()
        log.info("gateway stopped", extra={"event": "stopped"})

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    line = startup_failure(exc)
                    await send({"type": "lifespan.startup.failed", "message": line})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- ASGI entry ----------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    def common_headers(self, ctx: RequestContext) -> list[tuple[bytes, bytes]]:
        out = [
            (b"x-correlation-id", ctx.correlation_id.encode()),
            (b"x-request-id", ctx.request_id.encode()),
        ]
        origin = ctx.headers.get("origin")
        if origin:
            out += ops.cors_headers(self.settings, origin)
        if ctx.extra_response_headers:
            out += [
                (k.encode("latin-1"), str(v).encode("latin-1"))
                for k, v in ctx.extra_response_headers
            ]
        return out

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = context_from_scope(scope, self.settings)
        token = request_var.set(ctx)
        tracker = ResponseTracker(send)
        req_headers = ctx.headers
        has_body = bool(req_headers.get("transfer-encoding")) or (
            "content-length" in req_headers
            and req_headers["content-length"].strip() not in ("", "0")
        )
        extensions = scope.get("extensions")
        client: ClientLink | None = extensions.get("plant.client") if extensions else None
        body = BodySource(
            receive, self.max_body, has_body, self.audit_sample_cap, self.body_timeout,
            client.body_ready if client is not None and has_body else None,
        )
        ctx.scratch["body_source"] = body
        # only a real probe (GET/HEAD) goes unaudited: ``TRACE /health`` is refused and audited;
        # nothing on the admin listener is client traffic
        probe = ctx.path in ops.PROBES and ctx.method in ("GET", "HEAD")
        admin = False
        if self.admin_port:
            server = scope.get("server")
            if server is not None and server[1] == self.admin_port:
                admin = probe = True
        ran: list[Any] = []
        in_flight = metrics.IN_FLIGHT_COUNT
        in_flight.value += 1
        if self.tracing is not None and not probe:
            self.tracing.begin(ctx, ctx.path if ops.is_ops_route(ctx.method, ctx.path) else None)
        try:
            if admin:
                await self.ops_route(ctx, tracker, ops.ADMIN)
            elif ops.is_ops_route(ctx.method, ctx.path):
                await self.ops_route(ctx, tracker, self.public_ops)
            elif ops.is_preflight(ctx):
                status, headers = ops.preflight(ctx, self.settings)
                ctx.status_code = status
                await self.respond(tracker, status, headers + self.common_headers(ctx)[:2], b"")
            else:
                await self.run_pipeline(ctx, body, tracker, ran, client)
        except ResponseStarted:
            # logged as an upstream failure (events)
            if client is None:
                raise  # the server closes the connection
            client.abort()  # the same, without uvicorn's traceback for an expected cut
        except Exception as exc:
            log.exception("unexpected error")
            ctx.error_type, ctx.error_message = "internal-error", type(exc).__name__
            if not tracker.started:
                detail = "the gateway failed to handle the request"
                if self.settings.debug:
                    detail += f": {type(exc).__name__}: {exc}"
                await self.send_problem(ctx, tracker, Problem(500, "internal-error", detail))
        finally:
            await self.finish(ctx, ran, probe, tracker.sent)
            in_flight.value -= 1
            request_var.reset(token)

    async def run_pipeline(
        self, ctx: RequestContext, body: BodySource, send: ResponseTracker, ran: list[Any],
        client: ClientLink | None = None,
    ) -> None:
        problem = await self.run_steps(ctx, ran)
        if problem is None:
            problem = await self.forward(ctx, body, send, self.common_headers(ctx), client)
        if problem is not None:
            await self.send_problem(ctx, send, problem, "proxy")  # unless a guard refused

    async def run_steps(self, ctx: RequestContext, ran: list[Any]) -> Problem | None:
        """The pipeline for one request (HTTP or WebSocket handshake): the first refusal, or None.

        Steps with an ``after`` hook are collected in ``ran`` for ``finish``.
        """
        for step, has_after in self.steps:
            if has_after:
                ran.append(step)
            problem = await step.run(ctx)
            if problem is not None:
                # pending counter ops run now: an earlier guard's refusal wins
                problem = await flush_on_refusal(ctx, problem)
                ctx.refused_by = ctx.refused_by or step.name  # the batch names its guard
                return problem
        return None

    async def finish(
        self, ctx: RequestContext, ran: list[Any], probe: bool, sent: int = 0
    ) -> None:
        for step in reversed(ran):
            try:
                await step.after(ctx)
            except Exception:
                log.exception("after hook failed", extra={"step": step.name})
        status = ctx.status_code or 499
        elapsed = ctx.elapsed_ms()
        self.observe(ctx, status, elapsed)
        if ctx.policy_latency_ms is not None:
            metrics.POLICY_LATENCY.observe(ctx.policy_latency_ms / 1000)
        if probe:
            return
        try:
            self.audit.record(ctx)
        except Exception:
            log.exception("audit record failed")
        self.request_log.record(ctx, status, elapsed, sent)
        if self.tracing is not None:
            self.tracing.end(ctx, status)

    def observe(self, ctx: RequestContext, status: int, elapsed_ms: float) -> None:
        """The request's series: count, total time, and the split gateway / upstream per route.

        A dict lookup per series (LoopCounter/LoopHistogram: no lock, no allocation once seen).
        """
        route = self.route_label(ctx.path)
        method = ctx.method if ctx.method in metrics.METHODS else "OTHER"
        metrics.REQUESTS.labels(route, method, str(status)).inc()
        metrics.LATENCY.labels(route).observe(elapsed_ms / 1000)
        upstream_ms = ctx.upstream_latency_ms
        if upstream_ms is None:
            metrics.OVERHEAD.labels(route).observe(elapsed_ms / 1000)
            return
        metrics.UPSTREAM_LATENCY.labels(route, ctx.target_backend).observe(upstream_ms / 1000)
        metrics.OVERHEAD.labels(route).observe(max(0.0, elapsed_ms - upstream_ms) / 1000)

    async def ops_route(self, ctx: RequestContext, send: ResponseTracker, listener: str) -> None:
        assert self.deps is not None
        result = await ops.handle(
            ctx, self.settings, self.deps, self.proxy, self.guards, listener, self.public_ready
        )
        if result.problem is not None:
            await self.send_problem(ctx, send, result.problem)
            return
        ctx.status_code = result.status
        headers = [(b"content-type", result.content_type), (b"cache-control", b"no-store")]
        body = b"" if ctx.method == "HEAD" else result.body
        headers.append((b"content-length", str(len(result.body)).encode()))
        await self.respond(send, result.status, headers + self.common_headers(ctx), body)

    async def send_problem(
        self, ctx: RequestContext, send: ResponseTracker, problem: Problem, source: str = "gateway"
    ) -> None:
        """Answer with ``problem``; counted under the guard that refused, else ``source``."""
        ctx.status_code = problem.status
        ctx.error_type = ctx.error_type or problem.kind
        ctx.error_message = ctx.error_message or problem.detail
        metrics.DENIALS.labels(ctx.refused_by or source, problem.kind).inc()
        body = problem.render(
            base=self.settings.problem_type_base, instance=ctx.path,
            correlation_id=ctx.correlation_id,
        )
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in problem.headers]
        await self.respond(send, problem.status, headers + self.common_headers(ctx), body)

    @staticmethod
    async def respond(
        send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # --- websocket -----------------------------------------------------------------------
    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.admin_port and (scope.get("server") or (None, 0))[1] == self.admin_port:
            # the admin listener forwards nothing: the handshake is refused (HTTP 403)
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})
            return
        ctx = context_from_scope(scope, self.settings)
        token = request_var.set(ctx)
        tracker = ResponseTracker(send)
        ran: list[Any] = []
        try:
            message = await receive()
            if message["type"] != "websocket.connect":
                return
            problem = await self.run_steps(ctx, ran)
            if problem is None:
                problem = await self.proxy.websocket(ctx, receive, tracker)
            if problem is not None:
                await self.refuse_websocket(ctx, tracker, problem)
        except Exception:
            log.exception("websocket failed")
            ctx.error_type = ctx.error_type or "internal-error"
            if not tracker.started:
                await tracker({"type": "websocket.close", "code": 1011})
        finally:
            await self.finish(ctx, ran, False)
            request_var.reset(token)

    async def refuse_websocket(
        self, ctx: RequestContext, send: ResponseTracker, problem: Problem
    ) -> None:
        """Refuse the handshake with the problem as an HTTP answer when the server supports it."""
        ctx.status_code = problem.status
        ctx.error_type = ctx.error_type or problem.kind
        ctx.error_message = ctx.error_message or problem.detail
        metrics.DENIALS.labels(ctx.refused_by or "proxy", problem.kind).inc()
        await send({"type": "websocket.close", "code": 1008, "reason": problem.kind})


def create_app(
    settings: Settings, deps: Dependencies | None = None, tune_runtime: bool = False
) -> GatewayApp:
    return GatewayApp(settings, deps, tune_runtime)


def factory() -> GatewayApp:
    """uvicorn factory (one per worker): settings from the environment set up by ``serve``."""
    from plant_gateway.logs import configure_logging
    from plant_gateway.settings import load_settings

    settings = load_settings()
    configure_logging(settings.log_level, settings.google_cloud_project)
    return create_app(settings, tune_runtime=True)


def build_tracing(settings: Settings) -> Any:
    """The Tracing of ``settings``, or None: with tracing off the SDK is not even imported."""
    if settings.trace_sample_rate <= 0:
        return None
    from plant_gateway.tracing import Tracing, quiet_exporter_logs

    quiet_exporter_logs(settings.log_level)
    return Tracing(settings)
