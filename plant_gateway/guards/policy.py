"""Policy step: build the policy input, ask the engine once, enforce the decision.

Python derives resource and action from the request; every rule lives in ``policies/`` (Rego).
A decision asking for Governor approval is completed by ``plant_gateway.governor`` (approval id
from the body, the platform's record) and decided again; an approval it relied on is consumed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from plant_gateway import governor
from plant_gateway.backends.base import DependencyError
from plant_gateway.context import Identity, RequestContext
from plant_gateway.memo import BoundedMemo
from plant_gateway.pipeline.identity import cached_identity
from plant_gateway.pipeline.step import GuardSpec, Phase
from plant_gateway.problems import Problem
from plant_gateway.problems import unavailable as dependency_unavailable

if TYPE_CHECKING:
    from plant_gateway.backends.base import Approvals, Counters, PolicyEngine
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

FLAG_NAMES = {
    "rbac": "enable_rbac",
    "trial_mode": "enable_trial_mode",
    "governor_approval": "enable_governor_approval",
    "sandbox_routing": "enable_sandbox_routing",
}
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
METHOD_ACTIONS = {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}
VERB_ACTIONS = {"execute": "execute", "run": "execute", "approve": "approve", "deploy": "deploy"}
EXPORT_WORDS = frozenset({"export", "exports", "data_export", "data_exports"})
API_PREFIX = re.compile(r"^api/v\d+$")
_API_VERSION = re.compile(r"v\d+$")  # API_PREFIX's second segment, matched at its start
_NOT_IDS = frozenset(VERB_ACTIONS) | EXPORT_WORDS
ID_LIKE = re.compile(r"\d|^[0-9a-f]{16,}$|^[0-9a-f]{8}-[0-9a-f]{4}-", re.IGNORECASE)
JWT_FIELDS = (
    "user_id", "subject", "email", "roles", "customer_id", "governor_agent_id", "agent_id",
    "trial_mode", "trial_expires_at", "issuer",
)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """``GATEWAY_TYPE`` (in the policy input), ``APPROVAL_UI_URL`` and the JSON depth limit."""

    gateway_type: str
    approval_ui_url: str
    max_json_depth: int

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicyConfig:
        return cls(settings.gateway_type, settings.approval_ui_url, settings.max_json_depth)


# --- input derivation --------------------------------------------------------------------------


def _norm(segment: str) -> str:
    return segment.lower().replace("-", "_")


_SPLIT_CACHE_SIZE = 4096
_SPLIT_CACHE_KEY_MAX = 256
_SPLIT_CACHE: BoundedMemo[str, tuple[str, str | None, str | None, str]] = BoundedMemo(
    _SPLIT_CACHE_SIZE
)


def split_path(path: str) -> tuple[str, str | None, str | None, str]:
    """``_split_path`` memoised for short paths (bounded: cleared when full)."""
    found = _SPLIT_CACHE.data.get(path)
    if found is None:
        found = _split_path(path)
        if len(path) <= _SPLIT_CACHE_KEY_MAX:
            _SPLIT_CACHE.put(path, found)
    return found


def _split_path(path: str) -> tuple[str, str | None, str | None, str]:
    """``(resource, resource_id, verb, template)`` for ``/api/v1/<resource>/<id>/<verb>``.

    An id is the first segment after the resource that looks like one (has a digit, a UUID or
    a long hex string), or a lone non-verb segment; the verb is the last non-id segment.
    """
    segments = [s for s in path.split("?", 1)[0].split("/") if s]
    # == API_PREFIX.match(f"{segments[0]}/{segments[1]}") without building the string
    if len(segments) >= 2 and segments[0] == "api" and _API_VERSION.match(segments[1]):
        prefix, segments = segments[:2], segments[2:]
    else:
        prefix = []
    if not segments:
        return "", None, None, "/" + "/".join(prefix)
    resource, rest = _norm(segments[0]), segments[1:]
    search = ID_LIKE.search
    ids = {i for i, s in enumerate(rest) if search(s)}
    if not ids and len(rest) == 1 and _norm(rest[0]) not in _NOT_IDS:
        ids = {0}
    resource_id = rest[min(ids)] if ids else None
    verb = _norm(rest[-1]) if rest and (len(rest) - 1) not in ids else None
    template = [*prefix, segments[0], *("{id}" if i in ids else s for i, s in enumerate(rest))]
    return resource, resource_id, verb, "/" + "/".join(template)


def derive_action(method: str, resource: str, verb: str | None) -> str:
    """CRUD action from the method and verb, then the named sensitive actions (policy data)."""
    method = method.upper()
    write = method not in READ_METHODS
    if verb in EXPORT_WORDS or resource in EXPORT_WORDS:
        return "export_data"
    if resource == "agents" and method == "DELETE":
        return "delete_agent"
    if resource == "customers" and method == "DELETE":
        return "delete_customer"
    if resource == "billing" and write:
        return "update_billing"
    if resource == "subscriptions" and write:
        return "change_subscription"
    if method == "POST" and verb in VERB_ACTIONS:
        return VERB_ACTIONS[verb]
    return "read" if not write else METHOD_ACTIONS.get(method, "update")


def iso_to_ns(value: Any) -> int | None:
    """ISO 8601 (``Z`` or offset; naive means UTC) or epoch seconds, as epoch nanoseconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value * 1_000_000_000)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp()) * 1_000_000_000 + parsed.microsecond * 1000


def jwt_input(identity: Identity | None) -> dict[str, Any]:
    """The policy-relevant claims only: no ``jti``/``iat``/``exp``, so decisions can be memoised."""
    if identity is None or identity.service_account:
        return {}
    doc: dict[str, Any] = {name: getattr(identity, name) for name in JWT_FIELDS}
    doc["sub"] = doc.pop("subject")
    doc["iss"] = doc.pop("issuer")
    doc["trial_expires_ns"] = iso_to_ns(identity.trial_expires_at)
    return doc


def flags_input(flags: Any, ctx: RequestContext) -> dict[str, bool]:
    """Per-request guard flags; without a flags backend, or when it fails, every check is on."""
    if flags is None:
        return dict.fromkeys(FLAG_NAMES, True)
    out: dict[str, bool] = {}
    for key, flag in FLAG_NAMES.items():
        try:
            out[key] = True if flags is None else bool(flags.enabled(flag, ctx))
        except Exception:  # noqa: BLE001 - a broken flag never switches a guard off
            out[key] = True
    return out


class JwtInputCache:
    """``jwt_input`` per cached Identity (``auth.cached_identity``): one object per verified
    token, never mutated, so the document is built once per token (checked with ``is``)."""

    __slots__ = ("entries",)

    def __init__(self, size: int = 10_000) -> None:
        self.entries: BoundedMemo[str, tuple[Identity, dict[str, Any]]] = BoundedMemo(size)

    def get(self, identity: Identity | None) -> dict[str, Any]:
        if identity is None or identity.token_digest is None:
            return jwt_input(identity)
        key = identity.token_digest
        entry = self.entries.data.get(key)
        if entry is not None and entry[0] is identity:
            return entry[1]
        doc = jwt_input(identity)
        self.entries.put(key, (identity, doc))
        return doc


def _jwt_doc(ctx: RequestContext, jwt_docs: JwtInputCache | None) -> dict[str, Any]:
    cached = cached_identity(ctx) if jwt_docs is not None else None
    if cached is None or jwt_docs is None:
        return jwt_input(ctx.identity)
    return jwt_docs.get(cached)


def build_input(
    ctx: RequestContext,
    gateway_type: str,
    flags: Any,
    jwt_docs: JwtInputCache | None = None,
    static_flags: dict[str, bool] | None = None,
    approval_id: str | None = None,
) -> dict[str, Any]:
    """The input document; fills ``ctx.resource/action/resource_id`` on the way.

    With ``jwt_docs`` the ``jwt`` part is shared by the requests of one token: read-only.
    ``static_flags``: the flags of a backend whose values never depend on the request.
    ``approval_id``: the approval the request names (``governor.header_id``).
    """
    resource, resource_id, verb, template = split_path(ctx.upstream_path or ctx.path)
    action = derive_action(ctx.method, resource, verb)
    ctx.resource, ctx.action, ctx.resource_id = resource, action, resource_id
    identity = ctx.identity
    doc: dict[str, Any] = {
        "jwt": _jwt_doc(ctx, jwt_docs),
        "resource": resource,
        "action": action,
        "method": ctx.method.upper(),
        "path": template,
        "gateway_type": gateway_type,
        "client": {
            "service_key": bool(ctx.service_key_route),
            "service_account": identity.service_account if identity else None,
        },
        "flags": flags_input(flags, ctx) if static_flags is None else dict(static_flags),
        "now_ns": time.time_ns(),
    }
    if approval_id is not None:
        governor.add_approval(doc, ctx, {"id": approval_id})
    return doc


# --- enforcement --------------------------------------------------------------------------------


def governor_redirect(
    ctx: RequestContext, decision: dict[str, Any], approval_ui_url: str
) -> Problem:
    found = decision.get("redirect")
    redirect: dict[str, Any] = found if isinstance(found, dict) else {}
    action = str(redirect.get("action") or ctx.action or "")
    agent_id = redirect.get("agent_id") or (ctx.resource_id if ctx.resource == "agents" else None)
    query = {"action": action, "resource": ctx.resource or "", "return_to": ctx.path,
             "correlation_id": ctx.correlation_id}
    if agent_id:
        query["agent_id"] = str(agent_id)
    if ctx.resource_id:
        query["resource_id"] = ctx.resource_id
    separator = "&" if "?" in approval_ui_url else "?"
    location = f"{approval_ui_url}{separator}{urlencode(query)}"
    headers = [
        ("location", location),
        ("x-governor-approval-required", "true"),
        ("x-governor-action", action),
        ("x-governor-agent-id", str(agent_id or "none")),
    ]
    detail = f"Action '{action}' requires Governor approval."
    extra = {"action": action, "approval_url": location, "required_permission": action}
    return Problem(307, "governor-approval-required", detail, extra=extra, headers=headers)


def to_problem(
    ctx: RequestContext, decision: dict[str, Any], approval_ui_url: str
) -> Problem:
    """The problem for a denying decision (deny is the default for anything unexpected)."""
    status, kind = decision.get("status"), decision.get("kind")
    reason = str(decision.get("reason") or "denied by policy")
    if status == 307 or kind == "governor-approval-required":
        return governor_redirect(ctx, decision, approval_ui_url)
    if kind == "budget-exceeded":  # the deployed OPA's agent_budget package refused
        return Problem(402, "budget-exceeded", "The budget policy refused the request.",
                       extra={"reason": reason}, headers=[("retry-after", "3600")])
    if kind == "trial-expired":
        detail = "The trial period has ended."
        return Problem(403, "trial-expired", detail, extra={"reason": reason})
    required = decision.get("required_permission")
    extra: dict[str, Any] = {"reason": reason}
    if required:
        extra["required_permission"] = required
    detail = f"Permission '{required}' is required." if required else "Permission denied."
    return Problem(403, "permission-denied", detail, extra=extra)


def unavailable(reason: str) -> Problem:
    return dependency_unavailable(
        "policy", "The policy engine could not decide; the request was denied.",
        kind="policy-unavailable", retry_after_s=5, extra={"reason": reason},
    )


class PolicyStep:
    name = "policy"

    def __init__(
        self, config: PolicyConfig, engine: PolicyEngine | None, flags: Any,
        counters: Counters | None = None, approvals: Approvals | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.flags = flags
        self.jwt_docs = JwtInputCache()
        self.static_flags: dict[str, bool] | None = None
        if getattr(flags, "static", False) is True:
            self.static_flags = {
                key: bool(flags.enabled(flag, None)) for key, flag in FLAG_NAMES.items()
            }
        # an approval is consumed on the request's counter batch (the registry sets ``batched``)
        self.counters = counters
        self.batched = False
        self.governor = governor.GovernorApprovals(approvals, counters, config.max_json_depth)

    async def run(self, ctx: RequestContext) -> Problem | None:
        if ctx.is_public:
            return None
        approval_id = governor.header_id(ctx)
        if isinstance(approval_id, Problem):
            return approval_id
        policy_input = build_input(
            ctx, self.config.gateway_type, self.flags, self.jwt_docs, self.static_flags,
            approval_id,
        )
        if self.engine is None:
            return unavailable("no policy engine is configured")
        ctx.policy_latency_ms = 0.0
        try:
            decision = await self.decide(ctx, policy_input)
            if governor.needs_approval(decision):
                completed = await self.governor.complete(
                    ctx, policy_input, decision, lambda doc: self.decide(ctx, doc)
                )
                if isinstance(completed, Problem):
                    ctx.policy_decision = governor.with_note(ctx, decision)
                    return completed
                decision = completed
        except DependencyError as exc:
            ctx.error_message = str(exc)
            return unavailable("engine error, timeout or undefined decision")
        problem = self.apply(ctx, decision)
        if problem is None and decision.get("approval_used") is True:
            return await self.governor.consume(ctx, decision, self.batched)
        return problem

    async def decide(self, ctx: RequestContext, policy_input: dict[str, Any]) -> dict[str, Any]:
        """One evaluation; its time is added to ``ctx.policy_latency_ms``."""
        assert self.engine is not None
        started = time.perf_counter()
        try:
            return await self.engine.decide(policy_input)
        finally:
            elapsed = (time.perf_counter() - started) * 1000.0
            ctx.policy_latency_ms = (ctx.policy_latency_ms or 0.0) + elapsed

    def apply(self, ctx: RequestContext, decision: dict[str, Any]) -> Problem | None:
        ctx.policy_decision = governor.with_note(ctx, decision)
        policies = decision.get("policies")
        ctx.policies_evaluated = [str(p) for p in policies] if isinstance(policies, list) else []
        ctx.policy_decision_id = decision.get("decision_id")
        target = decision.get("target_backend")
        ctx.target_backend = target if target in ("sandbox", "production") else "production"
        if decision.get("allow") is True:
            return None
        return to_problem(ctx, decision, self.config.approval_ui_url)


def build(config: PolicyConfig, deps: Dependencies) -> PolicyStep:
    return PolicyStep(
        config, deps.policy, deps.flags, counters=deps.counters, approvals=deps.approvals,
    )


# batched: a Governor approval it relies on is consumed in the request's counters round trip
GUARD = GuardSpec(
    name="policy", phase=Phase.ACCESS, config=PolicyConfig.from_settings, build=build,
    batched=True,
)
