"""One backend the gateway forwards to: its connection pool, circuit breaker and identity.

Also how its failures are counted and answered (metrics, events, the breaker, 502/503).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp
from yarl import URL

from plant_gateway import events, metrics, problems
from plant_gateway.backends.base import DependencyStatus
from plant_gateway.forwarding.breaker import CircuitBreaker
from plant_gateway.forwarding.client import UpstreamPool, pool_for_url
from plant_gateway.forwarding.id_tokens import IdTokenSource
from plant_gateway.memo import BoundedMemo
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.settings import Settings

_URL_CACHE_LIMIT = 1024  # upstream URLs built per (path, query): bounded count and key size
_URL_CACHE_KEY_MAX = 512
SAFE_PATH = "/:@!$&'()*+,;=-._~"


class Upstream:
    """One backend: its own connection pool and circuit breaker."""

    def __init__(self, name: str, base_url: str, settings: Settings) -> None:
        self.name = name
        self.base = URL(base_url)
        self.settings = settings
        self.breaker = CircuitBreaker(
            name, settings.breaker_failure_threshold, settings.breaker_reset_s
        )
        self.session: aiohttp.ClientSession | None = None  # websockets, checks, ID tokens
        self.pool: UpstreamPool | None = None  # HTTP forwarding
        port = self.base.port
        host = self.base.raw_host or ""
        if ":" in host:
            host = f"[{host}]"
        self.host_header = (host if self.base.is_default_port() else f"{host}:{port}").encode()
        self._base_path = self.base.raw_path.rstrip("/")
        self._targets: BoundedMemo[tuple[str, str], bytes] = BoundedMemo(_URL_CACHE_LIMIT)
        self.id_tokens = (
            IdTokenSource(settings.plant_backend_audience or base_url)
            if settings.plant_backend_use_id_token else None
        )
        self._origin = str(self.base.origin())
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.upstream_connect_timeout_s,
            sock_read=settings.upstream_read_timeout_s,
        )

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.settings.upstream_pool_size, ttl_dns_cache=300, enable_cleanup_closed=True
        )
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            timeout=self.timeout, cookie_jar=aiohttp.DummyCookieJar(),
        )
        self.pool = pool_for_url(
            self.base, limit=self.settings.upstream_pool_size,
            connect_timeout=self.settings.upstream_connect_timeout_s,
            read_timeout=self.settings.upstream_read_timeout_s,
            pool_timeout=self.settings.upstream_pool_timeout_s,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.session is not None:
            await self.session.close()

    def target(self, path: str, query: str) -> bytes:
        """The request target (percent-encoded path and query) as bytes, like ``url``."""
        key = (path, query)
        found = self._targets.data.get(key)
        if found is None:
            text = self._base_path + quote(path, safe=SAFE_PATH)
            found = (f"{text}?{query}" if query else text or "/").encode("latin-1", "replace")
            if len(path) + len(query) <= _URL_CACHE_KEY_MAX:
                self._targets.put(key, found)
        return found

    def url(self, path: str, query: str) -> URL:
        """``target`` as an absolute URL (aiohttp: WebSockets, the OpenAPI fetch)."""
        return URL(self._origin + self.target(path, query).decode("latin-1"), encoded=True)

    async def auth_field(self) -> list[tuple[bytes, bytes]]:
        return [(k.encode(), v.encode()) for k, v in await self.auth_header()]

    async def auth_header(self) -> list[tuple[str, str]]:
        if self.id_tokens is None or self.session is None:
            return []
        return [("Authorization", f"Bearer {await self.id_tokens.get(self.session)}")]

    async def check(self) -> DependencyStatus:
        """Reachable means: any HTTP answer within the connect timeout."""
        assert self.session is not None
        started = time.perf_counter()
        try:
            timeout = aiohttp.ClientTimeout(total=min(3.0, self.settings.upstream_read_timeout_s))
            async with self.session.get(self.base.with_path("/"), timeout=timeout) as resp:
                await resp.release()
            ok, detail = True, f"circuit {self.breaker.state}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, detail = False, f"unreachable ({type(exc).__name__})"
        latency = (time.perf_counter() - started) * 1000
        return DependencyStatus(f"upstream_{self.name}", ok, True, detail, latency)


def no_id_token() -> Problem:
    """503: the backend's Google ID token could not be had (the metadata server failed)."""
    return problems.unavailable(
        "id-token", "could not obtain a backend identity token", kind="upstream-unavailable"
    )


def unavailable(upstream: Upstream, why: str) -> Problem:
    """503 with the breaker's Retry-After when it is open."""
    retry = upstream.breaker.retry_after() if upstream.breaker.state == "open" else 1
    return problems.unavailable(
        "upstream", f"the backend is unavailable: {why}", kind="upstream-unavailable",
        retry_after_s=retry,
    )


def bad_gateway(upstream: Upstream, exc: Exception) -> Problem:
    """The backend answered something that is not HTTP (or broke off): 502, a breaker failure."""
    count(upstream, "bad_gateway", type(exc).__name__)
    upstream.breaker.failure()
    return Problem(502, "bad-gateway", "the backend gave an invalid response")


def count(upstream: Upstream, kind: str, error: str = "") -> None:
    """One upstream failure of ``kind``: the metric and the (rate-limited) event line."""
    metrics.UPSTREAM_ERRORS.labels(upstream.name, kind).inc()
    events.upstream_failure(upstream.name, kind, error)  # one line per kind per 10 s at most
