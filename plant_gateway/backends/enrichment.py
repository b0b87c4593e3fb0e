"""Customer enrichment: the backend's ``/api/v1/auth/validate`` names a token's customer.

Answers are cached per token digest until the token expires; one lookup in flight per token;
a rejection (401/404) is an invalid token, any other failure is a dependency outage. With an
IAM-protected backend (``PLANT_BACKEND_USE_ID_TOKEN``) the lookup carries the gateway's Google
ID token in ``Authorization`` and the caller's token in ``X-Original-Authorization``, as every
forwarded request does (the backend reads the caller's token there first).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import aiohttp

from plant_gateway import events
from plant_gateway.backends.base import DependencyError, DependencyStatus
from plant_gateway.forwarding import IdTokenSource

log = logging.getLogger(__name__)

VALIDATE_PATH = "/api/v1/auth/validate"
NEGATIVE_TTL_S = 60.0
MAX_BODY_BYTES = 64 * 1024


class EnrichmentRejected(Exception):
    """The backend does not know this token or its user (401/404): the token is refused."""


@dataclass(frozen=True, slots=True)
class Enrichment:
    customer_id: str | None
    email: str | None


class CustomerEnricher:
    """Looks up (and caches) the customer of a token that carries no ``customer_id``."""

    name = "customer_enrichment"

    def __init__(
        self, backend_url: str, *, timeout_s: float, cache_size: int = 10_000,
        id_token: IdTokenSource | None = None,
    ) -> None:
        self._url = backend_url.rstrip("/") + VALIDATE_PATH
        self._id_token = id_token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._cache: OrderedDict[str, tuple[float, Enrichment | None]] = OrderedDict()
        self._cache_size = max(cache_size, 1)
        self._inflight: dict[str, asyncio.Future[Enrichment]] = {}
        self._session: aiohttp.ClientSession | None = None
        self.lookups = 0

    async def start(self) -> None:
        self._ensure_session()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self) -> DependencyStatus:
        return DependencyStatus(self.name, True, required=False, detail="lookups on demand")

    def cached(self, digest: str) -> Enrichment | None:
        """A still-valid positive answer for this token, without any network call."""
        entry = self._cache.get(digest)
        if entry is None or entry[0] <= time.time() or entry[1] is None:
            return None
        return entry[1]

    async def lookup(self, token: str, digest: str, exp: int) -> Enrichment:
        """The token's customer; ``EnrichmentRejected`` (401) or ``DependencyError`` (503)."""
        entry = self._cache.get(digest)
        if entry is not None and entry[0] > time.time():
            self._cache.move_to_end(digest)
            if entry[1] is None:
                raise EnrichmentRejected("token not recognised by the backend")
            return entry[1]
        pending = self._inflight.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_and_cache(token, digest, exp))
            self._inflight[digest] = pending
            pending.add_done_callback(lambda _f: self._inflight.pop(digest, None))
        return await asyncio.shield(pending)

    async def _fetch_and_cache(self, token: str, digest: str, exp: int) -> Enrichment:
        try:
            result = await self._fetch(token)
        except EnrichmentRejected:
            self._store(digest, min(float(exp), time.time() + NEGATIVE_TTL_S), None)
            raise
        self._store(digest, float(exp), result)
        return result

    def _store(self, digest: str, until: float, value: Enrichment | None) -> None:
        self._cache[digest] = (until, value)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _fetch(self, token: str) -> Enrichment:
        self.lookups += 1
        try:
            headers = await self._headers(token)
            async with self._ensure_session().get(
                self._url, headers=headers, allow_redirects=False
            ) as response:
                if response.status in (401, 404):
                    raise EnrichmentRejected(f"backend answered {response.status}")
                if response.status != 200:
                    raise DependencyError(f"customer lookup answered {response.status}")
                body = await _read_capped(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            events.dependency("customer_lookup").down(type(exc).__name__)
            raise DependencyError(f"customer lookup failed: {type(exc).__name__}") from None
        except DependencyError as exc:
            events.dependency("customer_lookup").down(str(exc))
            raise
        events.dependency("customer_lookup").up()
        return _parse(body)


    async def _headers(self, token: str) -> dict[str, str]:
        caller = f"Bearer {token}"
        if self._id_token is None:
            return {"Authorization": caller, "Accept": "application/json"}
        gateway = await self._id_token.get(self._ensure_session())
        return {"Authorization": f"Bearer {gateway}", "X-Original-Authorization": caller,
                "Accept": "application/json"}


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(16384):
        body.extend(chunk)
        if len(body) > MAX_BODY_BYTES:
            raise DependencyError("customer lookup answer too large")
    return bytes(body)


def _parse(body: bytes) -> Enrichment:
    try:
        document: Any = json.loads(body)
    except ValueError:
        raise DependencyError("customer lookup answer is not JSON") from None
    if not isinstance(document, dict):
        raise DependencyError("customer lookup answer is not an object")
    user = document.get("user")
    source = user if isinstance(user, dict) and "customer_id" not in document else document
    return Enrichment(_text(source.get("customer_id")), _text(source.get("email")))


def _text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str | int):
        text = str(value).strip()
        return text or None
    return None
