"""Remote policy engine: an OPA server's REST Data API (``POST /v1/data/<path>``) over aiohttp.

Pooled connections, a per-call timeout, a circuit breaker; undefined decisions and errors raise.
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from plant_gateway import events
from plant_gateway.backends.base import DependencyError, DependencyStatus
from plant_gateway.forwarding import IdTokenSource
from plant_gateway.settings import Settings


class Breaker:
    """closed -> open after ``threshold`` consecutive failures -> one probe after ``reset_s``."""

    def __init__(self, threshold: int, reset_s: float) -> None:
        self.threshold = threshold
        self.reset_s = reset_s
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half_open" if time.monotonic() - self.opened_at >= self.reset_s else "open"

    def admit(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self.probing = False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.failures >= self.threshold or self.opened_at is not None:
            self.opened_at = time.monotonic()


def normalise(result: Any) -> dict[str, Any]:
    """OPA's ``result`` as a decision document; a bare boolean (the deployed policies) is allowed.

    A document without ``allow`` is undefined for the gateway and raises.
    """
    if isinstance(result, bool):
        return {
            "allow": result,
            "status": 200 if result else 403,
            "kind": None if result else "permission-denied",
            "reason": "allowed" if result else "denied by policy",
            "required_permission": None,
            "redirect": None,
            "target_backend": "production",
            "obligations": {},
        }
    if isinstance(result, dict) and isinstance(result.get("allow"), bool):
        return dict(result)
    raise DependencyError("policy decision is undefined (no boolean 'allow')")


class RemotePolicyEngine:
    """``PolicyEngine`` asking OPA; ``decision_id`` (when OPA logs decisions) is kept.

    On Cloud Run the deployed OPA service is IAM-protected: each call then carries a Google ID
    token for the OPA URL (``OPA_USE_ID_TOKEN``, on by default when ``K_SERVICE`` is set).
    """

    name = "policy"

    def __init__(self, settings: Settings) -> None:
        assert settings.opa_service_url
        self.base = settings.opa_service_url.rstrip("/")
        self.decision_path = settings.bundle_decision_path
        self.timeout = aiohttp.ClientTimeout(total=settings.opa_timeout_s)
        self.pool_size = max(8, settings.upstream_pool_size // 4)
        self.breaker = Breaker(settings.breaker_failure_threshold, settings.breaker_reset_s)
        self.id_token = IdTokenSource(self.base) if settings.opa_id_token else None
        self._session: aiohttp.ClientSession | None = None
        self.health = events.dependency("policy")  # one log line per outage and recovery

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.pool_size, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)
        return self._session

    async def decide(self, policy_input: dict[str, Any]) -> dict[str, Any]:
        body = await self.post(self.decision_path, policy_input)
        if "result" not in body:
            raise DependencyError("policy decision is undefined (OPA answered without result)")
        decision = normalise(body["result"])
        if body.get("decision_id"):
            decision["decision_id"] = str(body["decision_id"])
        return decision

    async def post(self, path: str, policy_input: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/data/<path>`` through the circuit breaker; the answer's JSON object."""
        if not self.breaker.admit():
            raise DependencyError("policy engine circuit is open")
        self._circuit()  # a probe let through: half-open
        try:
            body = await self._post(f"{self.base}/v1/data/{path}", policy_input)
        except DependencyError as exc:
            self.breaker.failure()
            self.health.down(str(exc))
            self._circuit()
            raise
        self.breaker.success()
        self._circuit()  # logged only when it was not closed
        self.health.up()
        return body

    def _circuit(self) -> None:
        events.circuit(self.breaker, "policy engine", self.breaker.state,
                       failures=self.breaker.failures)

    async def _headers(self) -> dict[str, str]:
        if self.id_token is None:
            return {}
        try:
            token = await self.id_token.get(self._client())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DependencyError(f"no ID token for OPA: {type(exc).__name__}") from None
        return {"Authorization": f"Bearer {token}"}

    async def _post(self, url: str, policy_input: dict[str, Any]) -> dict[str, Any]:
        try:
            headers = await self._headers()
            async with self._client().post(
                url, json={"input": policy_input}, headers=headers
            ) as response:
                if response.status != 200:
                    raise DependencyError(f"policy engine answered HTTP {response.status}")
                body = await response.json(content_type=None)
        except TimeoutError:
            raise DependencyError("policy engine timed out") from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise DependencyError(f"policy engine unreachable: {type(exc).__name__}") from None
        if not isinstance(body, dict):
            raise DependencyError("policy engine answered a non-object")
        return body

    async def start(self) -> None:
        self._client()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self) -> DependencyStatus:
        started = time.perf_counter()
        try:
            async with self._client().get(f"{self.base}/health") as response:
                ok = response.status == 200
                detail = "remote OPA" if ok else f"remote OPA /health answered {response.status}"
        except TimeoutError:
            ok, detail = False, "remote OPA /health timed out"
        except aiohttp.ClientError as exc:
            ok, detail = False, f"remote OPA unreachable: {type(exc).__name__}"
        latency = (time.perf_counter() - started) * 1000.0
        if ok and self.breaker.state != "closed":
            detail += f" (circuit {self.breaker.state})"
        return DependencyStatus(self.name, ok=ok, detail=detail, latency_ms=latency)
