"""The deployed OPA's own packages, combined with our bundle: drop-in for the deployed policy API.

The deployed OPA serves ``POST /v1/data/gateway/<package>/allow`` for ``rbac_pp``,
``trial_mode``, ``governor_role``, ``sandbox_routing`` and ``agent_budget``, each answering an
object (``allow``, ``deny_reason``, …); it does not serve our single entry point. With
``OPA_SERVICE_URL`` set and ``OPA_DECISION_PATH`` unset, a request's decision is:

* our bundle, evaluated in-process (the role model that fits real tokens: ``user``, ``admin``,
  ``agent_ops``, ``readonly``… — ``rbac_pp`` alone refuses all but its own role names), and
* the packages that apply to the request (``OPA_PACKAGES``), asked concurrently in one round,
  as the deployed gateway chose them: ``trial_mode`` for trial tokens, ``rbac_pp`` on a
  ``PP`` gateway only, the others always;

allowed only when all of them allow. A package that cannot answer (timeout, error, no
object) denies the request (503): never fail open. Answers are cached per input for
``OPA_CACHE_TTL_S`` seconds, so a busy token costs one round trip per few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from plant_gateway.backends.base import DependencyError, DependencyStatus

if TYPE_CHECKING:
    from plant_gateway.backends.base import PolicyEngine
    from plant_gateway.backends.policy_remote import RemotePolicyEngine
    from plant_gateway.settings import Settings

PACKAGE_ROOT = "gateway"


def applies(package: str, policy_input: dict[str, Any]) -> bool:
    """Whether ``package`` is asked for this request (the deployed gateway's choice)."""
    jwt = policy_input.get("jwt") or {}
    if package == "trial_mode":
        return jwt.get("trial_mode") is True
    if package == "rbac_pp":
        return policy_input.get("gateway_type") == "PP"
    return True


def package_input(policy_input: dict[str, Any]) -> dict[str, Any]:
    """The deployed packages' input: our document plus the fields ``agent_budget`` reads."""
    jwt = policy_input.get("jwt") or {}
    doc = {k: v for k, v in policy_input.items() if k not in ("now_ns", "flags")}
    doc["agent_id"] = jwt.get("agent_id") or jwt.get("sub")
    doc["customer_id"] = jwt.get("customer_id")
    return doc


def verdict(package: str, result: Any) -> dict[str, Any]:
    """A package's answer as ``{"allow": bool, "deny_reason": str | None, ...}``; anything
    without a boolean ``allow`` is undefined, which denies (fail closed)."""
    if isinstance(result, bool):
        return {"allow": result, "deny_reason": None if result else "denied"}
    if isinstance(result, dict) and isinstance(result.get("allow"), bool):
        return result
    raise DependencyError(f"OPA package {package} answered no boolean 'allow'")


def denial(package: str, answer: dict[str, Any]) -> dict[str, Any]:
    """The decision document for a package's refusal (same kinds as our bundle's)."""
    reason = str(answer.get("deny_reason") or f"denied by {PACKAGE_ROOT}.{package}")
    kind, status = "permission-denied", 403
    if package == "trial_mode" and "expired" in reason.lower():
        kind = "trial-expired"
    elif package == "agent_budget":
        kind, status = "budget-exceeded", 402
    return {"allow": False, "status": status, "kind": kind, "reason": reason,
            "required_permission": None, "redirect": None}


class AnswerCache:
    """Package answers per input, each kept ``ttl_s`` seconds; bounded, oldest dropped."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self.size, self.ttl_s = size, ttl_s
        self.entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def get(self, key: str, now: float) -> dict[str, Any] | None:
        entry = self.entries.get(key)
        if entry is None or now >= entry[0]:
            return None
        return entry[1]

    def put(self, key: str, answer: dict[str, Any], now: float) -> None:
        if self.size <= 0 or self.ttl_s <= 0:
            return
        self.entries[key] = (now + self.ttl_s, answer)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class PackagesPolicyEngine:
    """``PolicyEngine``: our bundle in-process AND the deployed OPA packages, deny wins."""

    name = "policy"

    def __init__(self, settings: Settings, local: PolicyEngine, remote: RemotePolicyEngine):
        self.local = local
        self.remote = remote
        self.packages = [p.strip("/") for p in settings.opa_packages]
        self.cache = AnswerCache(settings.policy_cache_size, settings.opa_cache_ttl_s)

    async def decide(self, policy_input: dict[str, Any]) -> dict[str, Any]:
        asked = [p for p in self.packages if applies(p, policy_input)]
        doc = package_input(policy_input)
        key = repr(sorted(doc.items(), key=lambda item: item[0]))
        answers = await asyncio.gather(*(self._ask(p, doc, key) for p in asked))
        decision = dict(await self.local.decide(policy_input))
        policies = list(decision.get("policies") or [])
        decision["policies"] = policies + [f"{PACKAGE_ROOT}.{p}" for p in asked]
        decision["packages"] = {
            p: {"allow": a["allow"], "deny_reason": a.get("deny_reason")}
            for p, a in zip(asked, answers, strict=True)
        }
        if decision.get("allow") is not True:
            return decision  # our bundle's refusal names the rule that refused
        for package, answer in zip(asked, answers, strict=True):
            if answer["allow"] is not True:
                return {**decision, **denial(package, answer)}
            if package == "sandbox_routing" and answer.get("route_to_sandbox") is True:
                decision["target_backend"] = "sandbox"
        return decision

    async def _ask(self, package: str, doc: dict[str, Any], key: str) -> dict[str, Any]:
        now = time.monotonic()
        cache_key = f"{package}\0{key}"
        cached = self.cache.get(cache_key, now)
        if cached is not None:
            return cached
        body = await self.remote.post(f"{PACKAGE_ROOT}/{package}/allow", doc)
        if "result" not in body:
            raise DependencyError(f"OPA package {package} is not loaded (undefined decision)")
        answer = verdict(package, body["result"])
        self.cache.put(cache_key, answer, now)
        return answer

    async def start(self) -> None:
        await self.local.start()
        await self.remote.start()

    async def close(self) -> None:
        await self.remote.close()
        await self.local.close()

    async def check(self) -> DependencyStatus:
        status = await self.remote.check()
        status.detail = f"{status.detail}; packages {', '.join(self.packages)} + local bundle"
        return status
