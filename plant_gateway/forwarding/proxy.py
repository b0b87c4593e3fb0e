"""The proxy: a request to the upstream that sandbox routing chose, and its answer back.

HTTP requests go through the lean client of ``client`` (the request head is built as bytes
straight from the client's raw headers, ``headers``); WebSockets (``websocket``), the ID-token
fetch and health checks use an aiohttp session. Timeouts, idempotent retries on connection
failure, a circuit breaker per upstream (``upstream``, ``breaker``), and the 502/503/504 problems.

Bounded: a request holds an upstream connection only while it is forwarded, and that ends when
its client goes away (the upstream exchange is aborted: the backend sees the disconnect), at
the request deadline (REQUEST_DEADLINE_S, ``deadlines``), or when a slow body times out (408);
waiting for a pooled connection is bounded too (UPSTREAM_POOL_TIMEOUT_S, 503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import aiohttp

from plant_gateway.backends.base import DependencyStatus
from plant_gateway.forwarding.client import (
    ConnectError,
    Disconnected,
    InvalidHeader,
    PoolTimeout,
    UpstreamError,
    UpstreamResponse,
)
from plant_gateway.forwarding.deadlines import CLIENT_GONE, DEADLINE, ClientLink, Deadlines
from plant_gateway.forwarding.headers import encoded_header_fields, invalid_header, request_head
from plant_gateway.forwarding.relay import ResponseStarted, relay
from plant_gateway.forwarding.upstream import (
    Upstream,
    bad_gateway,
    count,
    no_id_token,
    unavailable,
)
from plant_gateway.forwarding.websocket import forward_websocket
from plant_gateway.pipeline.ingress import (
    BodySource,
    BodyTimeout,
    BodyTooLarge,
    body_timeout,
    client_gone,
    read_body,
    too_large,
)
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.context import RequestContext
    from plant_gateway.settings import Settings

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
log = logging.getLogger("plant_gateway.proxy")  # the name users see: unchanged by the move

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with Content-Length: 0 when bodiless
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# request bodies up to this size (with a Content-Length) are read whole before an upstream
# connection is taken, as nginx buffers them: a client trickling its body then holds only its
# own connection, never a pooled one (larger or chunked bodies stream, bounded by the body
# timeout). 64 KiB x the 250 concurrent requests of an instance is 16 MiB at most.
BUFFERED_BODY = 64 * 1024


class Proxy:
    """Forwards requests to the upstream that sandbox routing chose (``ctx.target_backend``)."""

    name = "upstream"
    websocket = forward_websocket  # a method: no extra frame per WebSocket (websocket.py)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cost_header = settings.cost_response_header.lower().encode("latin-1")
        self.deadline_s = settings.request_deadline_s
        self.deadlines = Deadlines()
        self._client_gone = self.deadlines.client_gone  # bound once, set on every link
        production = Upstream("production", settings.plant_backend_url, settings)
        self.upstreams = {"production": production}
        if settings.plant_sandbox_url and settings.plant_sandbox_url != settings.plant_backend_url:
            self.upstreams["sandbox"] = Upstream("sandbox", settings.plant_sandbox_url, settings)

    def upstream(self, target: str) -> Upstream:
        return self.upstreams.get(target) or self.upstreams["production"]

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close(self) -> None:
        self.deadlines.close()
        for upstream in self.upstreams.values():
            await upstream.close()

    async def checks(self) -> list[DependencyStatus]:
        return list(await asyncio.gather(*(u.check() for u in self.upstreams.values())))

    async def forward(
        self, ctx: RequestContext, body: BodySource, send: Send, extra: list[tuple[bytes, bytes]],
        client: ClientLink | None = None,
    ) -> Problem | None:
        """Send the request upstream and stream the answer back; a Problem if nothing was sent.

        Stopped (the upstream exchange aborted, its connection freed) when ``client`` goes away
        or at the request deadline: the task is cancelled while inside this function only.
        One function, no inner coroutine: it runs for every request.
        """
        if client is not None and client.disconnected:
            return client_gone(ctx)  # gone during the steps: the backend never sees it
        upstream = self.upstream(ctx.target_backend)
        if not upstream.breaker.allow():
            return unavailable(upstream, "circuit open")
        task = client.task if client is not None else asyncio.current_task()
        assert task is not None
        deadlines = self.deadlines
        running = deadlines.running
        running[task] = ctx.started + self.deadline_s
        if deadlines.timer is None:
            deadlines.arm()
        if client is not None:
            client.on_disconnect = self._client_gone  # a no-op once this forward is over
        try:
            if ctx.body is None and body.has_body and ctx.content_length is not None \
                    and ctx.content_length <= BUFFERED_BODY:
                read = await read_body(ctx)  # before any upstream connection is taken
                if isinstance(read, Problem):
                    return read
            try:
                fields = encoded_header_fields(ctx, self.settings)
            except InvalidHeader:
                return invalid_header(ctx)
            if upstream.id_tokens is not None:
                problem = await self._id_token(upstream, fields)
                if problem is not None:
                    return problem
            chunked = ctx.body is None and body.has_body and ctx.content_length is None
            if chunked:
                fields.append((b"Transfer-Encoding", b"chunked"))
            elif ctx.body is None and not body.has_body and ctx.content_length is None \
                    and ctx.method in BODY_METHODS:
                fields.append((b"Content-Length", b"0"))
            target = upstream.target(ctx.upstream_path, ctx.query_string)
            try:
                head = request_head(ctx.method, target, upstream.host_header, fields)
            except InvalidHeader:
                return invalid_header(ctx)
            started = time.perf_counter()
            resp, problem = await self._send(upstream, ctx, body, head, chunked)
            if problem is not None:
                return problem
            assert resp is not None
            # observed per route with the request's other timings (app.finish)
            ctx.upstream_latency_ms = (time.perf_counter() - started) * 1000
            return await relay(upstream, ctx, resp, send, extra, self._cost_header)
        except asyncio.CancelledError:
            reason = deadlines.stopped.pop(task, None)
            if reason is None or task.uncancel() > 0:
                raise  # cancelled by someone else (shutdown)
            return self._stopped(ctx, reason, getattr(send, "started", True))
        finally:
            del running[task]  # disarmed: nothing after this may be cancelled by a stop

    async def _id_token(self, upstream: Upstream, fields: list[tuple[bytes, bytes]]
                        ) -> Problem | None:
        """Add the backend's ID token to ``fields``; a 503 when none can be had."""
        try:
            fields += await upstream.auth_field()
        except (aiohttp.ClientError, TimeoutError):
            upstream.breaker.failure()
            return no_id_token()
        return None

    def _stopped(self, ctx: RequestContext, reason: str, started: bool) -> Problem | None:
        """The forward was stopped: the problem to answer, if the answer has not started."""
        upstream = self.upstream(ctx.target_backend)
        count(upstream, "client_gone" if reason == CLIENT_GONE else "deadline")
        if reason == CLIENT_GONE:
            if not started:
                return client_gone(ctx)
            ctx.error_type = CLIENT_GONE  # the row keeps the status that was being sent
            return None
        ctx.error_type = DEADLINE
        if started:
            raise ResponseStarted("the request deadline passed while streaming")
        return Problem(504, "gateway-timeout",
                       f"the request did not complete within {self.deadline_s:g} s")

    async def _send(
        self, upstream: Upstream, ctx: RequestContext, body: BodySource, head: bytes,
        chunked: bool,
    ) -> tuple[UpstreamResponse | None, Problem | None]:
        assert upstream.pool is not None
        replayable = ctx.body is not None or not body.has_body
        retries = self.settings.upstream_retries if ctx.method in IDEMPOTENT and replayable else 0
        head_only = ctx.method == "HEAD"
        fresh = False
        for attempt in range(retries + 1):
            data: Any = ctx.body
            if data is None and body.has_body:
                data = body.chunks()
            try:
                resp = await upstream.pool.request(
                    head, data, chunked=chunked, head_only=head_only, fresh=fresh
                )
            except (ConnectError, Disconnected) as exc:
                if attempt < retries and body.received <= body.max_bytes:
                    # nothing reached the backend (or a stale pooled connection): safe to retry
                    count(upstream, "retry")
                    stale = isinstance(exc, Disconnected) and exc.reused
                    fresh = stale
                    if not stale:
                        await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                return None, self._failed(upstream, ctx, body, exc)
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised if unknown
                return None, self._failed(upstream, ctx, body, exc)
            upstream.breaker.success()
            return resp, None
        raise AssertionError("unreachable")

    def _failed(
        self, upstream: Upstream, ctx: RequestContext, body: BodySource, exc: Exception
    ) -> Problem:
        """Map a failed upstream call to its problem and feed the circuit breaker."""
        if body.received > body.max_bytes or isinstance(exc, BodyTooLarge):
            return too_large(body.max_bytes)
        if body.timed_out or isinstance(exc, BodyTimeout):
            return body_timeout(body.timeout or 0.0)  # the client's slowness, not the backend's
        if body.disconnected:
            return client_gone(ctx)
        if isinstance(exc, PoolTimeout):
            count(upstream, "pool_timeout")  # our own saturation: the breaker is not fed
            return Problem(
                503, "upstream-unavailable",
                f"no connection to the backend came free within "
                f"{self.settings.upstream_pool_timeout_s:g} s",
                headers=[("retry-after", "1")],
            )
        if isinstance(exc, ConnectError):
            count(upstream, "connect")
            upstream.breaker.failure()
            return unavailable(upstream, "connection failed")
        if isinstance(exc, TimeoutError):
            count(upstream, "timeout")
            upstream.breaker.failure()
            return Problem(504, "gateway-timeout", "the backend did not answer in time")
        if isinstance(exc, UpstreamError | ValueError):
            return bad_gateway(upstream, exc)
        raise exc
