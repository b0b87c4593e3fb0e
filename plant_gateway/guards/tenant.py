"""Tenant binding: the token's customer id overwrites the caller-supplied one.

Rules come from settings (query, path segment or JSON body); a rewritten body gets a true length.
A body that is not a JSON object, or nests deeper than ``MAX_JSON_DEPTH``, is a 400 (audit
``error_type`` ``invalid-body``), never a parser's ``RecursionError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

from plant_gateway import json_limits
from plant_gateway.context import RequestContext
from plant_gateway.pipeline.ingress import read_body
from plant_gateway.pipeline.step import GuardSpec, Phase
from plant_gateway.problems import Problem, unauthorized
from plant_gateway.routing import RouteSet, for_methods

if TYPE_CHECKING:
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings, TenantRule


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """``TENANT_RULES`` and the JSON depth limit of a body it rewrites."""

    rules: tuple[TenantRule, ...]
    max_json_depth: int = json_limits.MAX_DEPTH

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantConfig:
        return cls(tuple(settings.tenant_rules), settings.max_json_depth)


def bind_query(query: str, field: str, customer_id: str) -> str:
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != field]
    pairs.append((field, customer_id))
    return urlencode(pairs)


def bind_path(path: str, segment: int, customer_id: str) -> str | None:
    parts = path.split("/")
    index = segment + 1  # parts[0] is the empty string before the leading slash
    if index >= len(parts) or not parts[index]:
        return None
    parts[index] = customer_id
    return "/".join(parts)


def bind_body(
    body: bytes, field: str, customer_id: str, max_depth: int = json_limits.MAX_DEPTH
) -> bytes | None:
    """The JSON object with ``field`` overwritten, or None if the body is not a JSON object.

    Raises ``json_limits.TooDeep`` for a body nested deeper than ``max_depth``.
    """
    if not body.strip():
        doc: object = {}
    else:
        try:
            doc = json_limits.loads(body, max_depth)
        except json_limits.TooDeep:
            raise
        except ValueError:  # UnicodeDecodeError is one
            return None
    if not isinstance(doc, dict):
        return None
    doc[field] = customer_id
    return json.dumps(doc, separators=(",", ":")).encode()


def invalid_body(ctx: RequestContext, detail: str) -> Problem:
    """A 400 like every refused request (kind ``bad-request``); the audit row names the cause."""
    ctx.error_type = "invalid-body"
    return Problem(400, "bad-request", detail)


class TenantStep:
    name = "tenant"

    def __init__(
        self, rules: list[TenantRule], max_json_depth: int = json_limits.MAX_DEPTH
    ) -> None:
        self.rules = rules
        self.max_json_depth = max_json_depth
        self._compiled = [(RouteSet([for_methods(r.path, r.methods)]), r) for r in rules]
        # most requests match no rule at all
        self._any = RouteSet([for_methods(r.path, r.methods) for r in rules])

    def _rules_for(self, ctx: RequestContext) -> list[TenantRule]:
        method, path = ctx.method, ctx.upstream_path
        if not self._any(path, method):
            return []
        return [r for route, r in self._compiled if route(path, method)]

    async def run(self, ctx: RequestContext) -> Problem | None:
        rules = self._rules_for(ctx)
        if not rules:
            return None
        customer_id = ctx.identity.customer_id if ctx.identity else None
        if not customer_id:
            return unauthorized("unauthorized", "this route needs a token bound to a customer")
        for rule in rules:
            problem = await self._apply(ctx, rule, customer_id)
            if problem:
                return problem
        return None

    async def _apply(
        self, ctx: RequestContext, rule: TenantRule, customer_id: str
    ) -> Problem | None:
        if rule.location == "query":
            ctx.query_string = bind_query(ctx.query_string, rule.field, customer_id)
        elif rule.location == "path":
            new_path = bind_path(ctx.upstream_path, rule.segment or 0, customer_id)
            if new_path is None:
                return Problem(400, "bad-request", "the path carries no customer id")
            ctx.upstream_path = new_path
        else:
            body = await read_body(ctx)
            if isinstance(body, Problem):
                return body
            try:
                new_body = bind_body(body, rule.field, customer_id, self.max_json_depth)
            except json_limits.TooDeep as exc:
                return invalid_body(ctx, str(exc))
            if new_body is None:
                return invalid_body(ctx, "the body must be a JSON object")
            ctx.body = new_body
            ctx.body_rewritten = True
        return None


def build(config: TenantConfig, deps: Dependencies) -> TenantStep | None:
    if not config.rules:
        return None  # nothing to bind: not in the pipeline
    return TenantStep(list(config.rules), config.max_json_depth)


GUARD = GuardSpec(
    name="tenant", phase=Phase.REWRITE, config=TenantConfig.from_settings, build=build
)
