"""Governor approvals on the request path: the approval id a request carries, the platform's
record of it (``APPROVALS_URL``) for the policy to judge, and its single use.

The policy step calls in here only when the decision asks for Governor approval; whether an
approval is valid is decided by policies/governor.rego, never here. An approval the decision
relied on (``approval_used``) is consumed through the request's counter batch, so it is used
once across every gateway instance, and released again if another guard refuses the request.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from plant_gateway import json_limits, problems
from plant_gateway.backends.base import ApprovalRecord, DependencyError
from plant_gateway.context import RequestContext
from plant_gateway.counters import ApprovalConsumeOp
from plant_gateway.pipeline.counter_batch import submit
from plant_gateway.pipeline.ingress import read_body
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.backends.base import Approvals, Counters

# X-Approval-ID first; X-Governor-Approval-ID is the header this gateway read before.
HEADERS = ("x-approval-id", "x-governor-approval-id")
BODY_FIELD = "approval_id"
# The platform's ids are APR-<token_urlsafe(12)> or APR-<uuid4>. Anything else of URL-safe
# characters up to 128 is accepted; an id goes into the approvals API's path, so no "/", "%",
# spaces or control characters, and it starts with a letter or digit (never "." or "..").
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:-]{0,127}")
NOTE = "approval"  # ctx.scratch key: what the audit row says about the approval
GRACE_S = 86_400  # the used mark outlives the approval's expiry by a day
NO_EXPIRY_TTL_S = 366 * 86_400  # a record without expiry stays used for a year
Decide = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def needs_approval(decision: dict[str, Any]) -> bool:
    return decision.get("kind") == "governor-approval-required"


def valid_id(value: Any) -> str | None:
    """``value`` when it is an approval id the gateway accepts, else None."""
    if isinstance(value, str) and ID_RE.fullmatch(value):
        return value
    return None


def bad_id(ctx: RequestContext, where: str) -> Problem:
    """A 400 like every refused request (kind ``bad-request``); the audit row names the cause."""
    ctx.error_type = "invalid-approval-id"
    detail = (f"the approval id in {where} must be 1-128 letters, digits or '._~:-', "
              "starting with a letter or digit")
    return Problem(400, "bad-request", detail)


def header_id(ctx: RequestContext) -> str | Problem | None:
    """The id of ``X-Approval-ID`` (or ``X-Governor-Approval-ID``); a malformed one is a 400."""
    for name in HEADERS:
        value = ctx.header(name)
        if value is not None:
            found = valid_id(value.strip())
            if found is None:
                return bad_id(ctx, f"the {name} header")
            note(ctx, found, "header")
            return found
    return None


def is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and
                                           media.endswith("+json"))


async def body_id(ctx: RequestContext, max_depth: int) -> str | Problem | None:
    """The top-level ``approval_id`` of a JSON object body; a body that is not JSON, not an
    object or nests deeper than ``max_depth`` names none. A malformed id is a 400."""
    if not is_json(ctx.header("content-type")):
        return None
    body = await read_body(ctx)  # buffered once; forwarded as read
    if isinstance(body, Problem):
        return body  # over MAX_BODY_BYTES: 413
    if not body.strip():
        return None
    try:
        doc = json_limits.loads(body, max_depth)
    except ValueError:  # not JSON, not UTF-8, too deep
        return None
    if not isinstance(doc, dict) or doc.get(BODY_FIELD) is None:
        return None
    found = valid_id(doc[BODY_FIELD])
    if found is None:
        return bad_id(ctx, f"the body's {BODY_FIELD} field")
    note(ctx, found, "body")
    return found


def note(ctx: RequestContext, approval_id: str, source: str) -> dict[str, Any]:
    """The audit's account of the request's approval (``opa_decisions.approval``)."""
    found: dict[str, Any] = {"id": approval_id, "source": source, "verified": None,
                             "consumed": None}
    ctx.scratch[NOTE] = found
    return found


def with_note(ctx: RequestContext, decision: dict[str, Any]) -> dict[str, Any]:
    """The decision as audited: with the approval note when the request named one (a copy:
    the engine may share the decision between requests)."""
    found = ctx.scratch.get(NOTE)
    return decision if found is None else {**decision, NOTE: found}


def unavailable(reason: str) -> Problem:
    return problems.unavailable(
        "approvals", f"The approval could not be checked ({reason}); the request was denied.",
        kind="approvals-unavailable", retry_after_s=5,
    )


def already_used(approval_id: str) -> Problem:
    return Problem(
        409, "approval-already-used",
        f"Approval '{approval_id}' was already used; each approval lets one request through.",
        extra={"approval_id": approval_id},
    )


def consume_ttl(expires_ns: Any, now_ns: int) -> int:
    """Seconds the used mark is kept: past the approval's own expiry, so it cannot come back."""
    if not isinstance(expires_ns, int) or isinstance(expires_ns, bool):
        return NO_EXPIRY_TTL_S
    return max(1, math.ceil((expires_ns - now_ns) / 1e9)) + GRACE_S


class ConsumeResolver:
    """Turns the ``approval_consume`` result into the request's refusal (or None) and keeps the
    audit note true: ``refunded`` runs when a later guard refused and the mark was released."""

    __slots__ = ("approval_id", "found")

    def __init__(self, approval_id: str, found: dict[str, Any]) -> None:
        self.approval_id = approval_id
        self.found = found

    def __call__(self, result: Any) -> Problem | None:
        if result is True:
            self.found["consumed"] = True
            return None
        if result is False:
            self.found["consumed"] = False
            return already_used(self.approval_id)
        self.found["consumed"] = None
        return unavailable("the used-approvals store did not answer")

    def refunded(self) -> None:
        self.found["consumed"] = False
        self.found["released"] = True


class GovernorApprovals:
    """The approval part of the policy step: verification with the platform and single use."""

    def __init__(
        self, approvals: Approvals | None, counters: Counters | None, max_json_depth: int
    ) -> None:
        self.approvals = approvals
        self.counters = counters
        self.max_json_depth = max_json_depth

    async def complete(
        self, ctx: RequestContext, policy_input: dict[str, Any], decision: dict[str, Any],
        decide: Decide,
    ) -> dict[str, Any] | Problem:
        """The decision asked for Governor approval: add what the request's approval is (body
        field, then the platform's record) to the input and decide again at each step."""
        if "approval" not in policy_input:
            found = await body_id(ctx, self.max_json_depth)
            if isinstance(found, Problem):
                return found
            if found is None:
                return decision  # no approval named: the redirect stands
            add_approval(policy_input, ctx, {"id": found})
            decision = await decide(policy_input)
            if not needs_approval(decision):
                return decision
        if self.approvals is None:
            return decision  # APPROVALS_URL unset: the policy's static data only
        return await self._verified(ctx, policy_input, decide)

    async def _verified(
        self, ctx: RequestContext, policy_input: dict[str, Any], decide: Decide
    ) -> dict[str, Any] | Problem:
        assert self.approvals is not None
        approval_id = policy_input["approval"]["id"]
        found = ctx.scratch.get(NOTE) or note(ctx, approval_id, "input")
        try:
            result = await self.approvals.lookup(approval_id, ctx.authorization)
        except DependencyError as exc:
            ctx.error_message = f"approval {approval_id}: {exc}"
            return unavailable("the approvals API did not answer")
        if isinstance(result, ApprovalRecord):
            found["verified"] = True
            add_approval(policy_input, ctx, result.as_input())
        else:
            found["verified"], found["not_verified"] = False, result.reason
            add_approval(policy_input, ctx, {"id": approval_id, "verified": False})
        return await decide(policy_input)

    async def consume(
        self, ctx: RequestContext, decision: dict[str, Any], batched: bool
    ) -> Problem | None:
        """Mark the approval the decision relied on as used (enqueued on the counter batch)."""
        found = ctx.scratch.get(NOTE)
        if found is None or self.counters is None:
            return None  # no counters (tools, tests): nothing to mark
        ttl = consume_ttl(decision.get("approval_expires_ns"), time.time_ns())
        op = ApprovalConsumeOp(found["id"], ttl)
        return await submit(ctx, self.counters, op, ConsumeResolver(found["id"], found), batched)


def add_approval(policy_input: dict[str, Any], ctx: RequestContext, doc: dict[str, Any]) -> None:
    """``input.approval`` and the id of the resource the request names (the record's agent or
    customer is compared with it)."""
    policy_input["approval"] = doc
    policy_input["resource_id"] = ctx.resource_id
