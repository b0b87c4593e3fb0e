"""The platform's Governor approvals: look an approval id up, for the policy to judge.

``HttpApprovals`` asks the PP approvals API (``GET {APPROVALS_URL}/{id}``, admin JWT required)
with the caller's own Authorization header and caches positive answers; ``StaticApprovals``
answers from a dict (tests, tools). Neither decides anything: policies/governor.rego does.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp

from plant_gateway.backends.base import (
    ApprovalRecord,
    DependencyError,
    DependencyStatus,
    NotVerified,
)

if TYPE_CHECKING:
    from plant_gateway.backends.base import Approvals
    from plant_gateway.settings import Settings

MAX_ANSWER_BYTES = 64 * 1024
CACHE_SIZE = 4096
# A positive answer is reused until the approval expires, but never longer than this: a record
# without expiry would otherwise be trusted forever by a long-running gateway.
MAX_POSITIVE_TTL_S = 300.0
UNKNOWN = NotVerified("unknown")
REFUSED = NotVerified("refused")


def create(settings: Settings) -> Approvals | None:
    """The HTTP backend when ``APPROVALS_URL`` is set; None: only the policy's static data."""
    if not settings.approvals_url:
        return None
    return HttpApprovals(settings.approvals_url, timeout_s=settings.approvals_timeout_s)


class StaticApprovals:
    """Records held in memory (tests, tools); ``down`` makes every lookup an outage."""

    name = "approvals"

    def __init__(self, records: dict[str, ApprovalRecord] | None = None) -> None:
        self.records = dict(records or {})
        self.down = False
        self.lookups = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def check(self) -> DependencyStatus:
        return DependencyStatus(self.name, True, required=False, detail="static records")

    async def lookup(
        self, approval_id: str, authorization: str | None
    ) -> ApprovalRecord | NotVerified:
        self.lookups += 1
        if self.down:
            raise DependencyError("approvals: static backend is down")
        return self.records.get(approval_id, UNKNOWN)


class HttpApprovals:
    """``GET {url}/{id}``: 200 a record, 404 unknown, 401/403 refused, anything else an outage."""

    name = "approvals"

    def __init__(
        self, url: str, *, timeout_s: float, cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._cache: OrderedDict[tuple[str, str], tuple[float, ApprovalRecord]] = OrderedDict()
        self._cache_size = max(cache_size, 1)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self.lookups = 0

    async def start(self) -> None:
        self._ensure_session()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self) -> DependencyStatus:
        # the API needs an admin token, which the gateway does not hold: looked up on demand
        return DependencyStatus(self.name, True, required=False, detail="lookups on demand")

    async def lookup(
        self, approval_id: str, authorization: str | None
    ) -> ApprovalRecord | NotVerified:
        # keyed by caller too: a record one token may read is not shown to another
        key = (approval_id, _digest(authorization))
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None and entry[0] > now:
            self._cache.move_to_end(key)
            return entry[1]
        result = await self._fetch(approval_id, authorization)
        if isinstance(result, ApprovalRecord):
            self._remember(key, result, now)
        return result

    def _remember(self, key: tuple[str, str], record: ApprovalRecord, now: float) -> None:
        until = now + MAX_POSITIVE_TTL_S
        if record.expires_ns is not None:
            until = min(until, record.expires_ns / 1e9)
        if until <= now:
            return
        self._cache[key] = (until, record)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _fetch(
        self, approval_id: str, authorization: str | None
    ) -> ApprovalRecord | NotVerified:
        self.lookups += 1
        headers = {"Accept": "application/json"}
        if authorization:
            headers["Authorization"] = authorization
        url = f"{self.url}/{quote(approval_id, safe='')}"
        try:
            async with self._ensure_session().get(
                url, headers=headers, allow_redirects=False
            ) as response:
                if response.status == 404:
                    return UNKNOWN
                if response.status in (401, 403):
                    return REFUSED
                if response.status != 200:
                    raise DependencyError(f"approvals API answered {response.status}")
                body = await _read_capped(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DependencyError(f"approvals API failed: {type(exc).__name__}") from None
        return parse_record(body, approval_id)


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(16384):
        body.extend(chunk)
        if len(body) > MAX_ANSWER_BYTES:
            raise DependencyError("approvals API answer too large")
    return bytes(body)


def parse_record(body: bytes, approval_id: str) -> ApprovalRecord:
    """The PP answer ``{approval_id, customer_id, agent_id, action, …, expires_at}`` as a record;
    an answer that is not one (or names another id) is an outage, never a verification."""
    try:
        doc: Any = json.loads(body)
    except ValueError:
        raise DependencyError("approvals API answer is not JSON") from None
    if not isinstance(doc, dict) or doc.get("approval_id") != approval_id:
        raise DependencyError("approvals API answer is not the record asked for")
    action = doc.get("action")
    if not isinstance(action, str) or not action:
        raise DependencyError("approvals API record has no action")
    return ApprovalRecord(
        approval_id=approval_id,
        action=action,
        agent_id=_optional_text(doc.get("agent_id")),
        customer_id=_optional_text(doc.get("customer_id")),
        expires_ns=_expiry_ns(doc.get("expires_at")),
    )


def _optional_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise DependencyError("approvals API record has a non-string id")
    return value


def _expiry_ns(value: Any) -> int | None:
    """PP's ``expires_at`` (ISO 8601; naive means UTC) in epoch nanoseconds; None: no expiry."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DependencyError("approvals API record has an invalid expires_at")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise DependencyError("approvals API record has an invalid expires_at") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp()) * 1_000_000_000 + parsed.microsecond * 1000


def _digest(authorization: str | None) -> str:
    return hashlib.sha256((authorization or "").encode("latin-1", "replace")).hexdigest()
