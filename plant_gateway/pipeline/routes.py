"""Routing: hostile paths (400), path rewrites, public and brute-force routes, service keys.

Route patterns (``plant_gateway.routing``) match exactly, by anchored prefix or one-segment
wildcard, optionally per method, never by suffix (docs/MIGRATING.md). A service-key route is
reached with the service key only (``X-CP-Registration-Key``), as on the deployed gateway: the
backend trusts those calls as coming from the platform's own backends, so a user's JWT does not
open them.
"""

from __future__ import annotations

import hmac
import re
from typing import TYPE_CHECKING

from plant_gateway.context import Identity, RequestContext
from plant_gateway.pipeline.step import Phase, PlumbingSpec
from plant_gateway.problems import Problem
from plant_gateway.routing import RouteSet

if TYPE_CHECKING:
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

SERVICE_KEY_HEADER = "x-cp-registration-key"
SERVICE_ACCOUNT = "cp-registration"
_ENCODED_BAD = ("%2f", "%5c", "%00", "%2e", "%25")
_CONTROL_OR_BACKSLASH = re.compile(r"[\x00-\x1f\x7f\\]")


def hostile_path(path: str, raw_path: str) -> str | None:
    """Why a path is refused (traversal, encoded separators, NUL, not normalised), or None."""
    if not path.startswith("/") or not raw_path.startswith("/"):
        return "path must start with '/'"
    if _CONTROL_OR_BACKSLASH.search(path):
        return "control characters or backslashes in path"
    if ("%" in raw_path or "%" in path) and _has_encoded_bad(raw_path, path):
        return "encoded separators, dots or percent signs in path"
    if "/." in path and any(s in (".", "..") for s in path.split("/")[1:]):
        return "dot segments in path"
    if "//" in path:
        return "empty segments in path"
    return None


def _has_encoded_bad(raw_path: str, path: str) -> bool:
    lowered_raw, lowered = raw_path.lower(), path.lower()
    return any(code in lowered_raw or code in lowered for code in _ENCODED_BAD)


def rewrite(path: str, rewrites: dict[str, str]) -> str:
    """Apply configured rewrites: exact keys, or ``prefix*`` keys that keep the rest of the path."""
    if path in rewrites:
        return rewrites[path]
    for source, target in rewrites.items():
        if source.endswith("*") and path.startswith(source[:-1]):
            return target.rstrip("*") + path[len(source) - 1 :]
    return path


class RoutesStep:
    name = "routes"

    def __init__(self, settings: Settings) -> None:
        self.rewrites = dict(settings.path_rewrites)
        self.public = list(settings.public_routes)
        self.brute_force = list(settings.brute_force_routes)
        self.service_key_routes = list(settings.service_key_routes)
        self._public = RouteSet(self.public)
        self._brute_force = RouteSet(self.brute_force)
        self._service_key_routes = RouteSet(self.service_key_routes)
        self._rewrite_prefixes = tuple(r[:-1] for r in self.rewrites if r.endswith("*"))
        key = settings.cp_registration_key
        self.service_key = key.get_secret_value().encode() if key else None

    async def run(self, ctx: RequestContext) -> Problem | None:
        reason = hostile_path(ctx.path, ctx.scratch.get("raw_path", ctx.path))
        if reason:
            return Problem(400, "bad-request", f"refused path: {reason}")
        path = ctx.path
        if path in self.rewrites or path.startswith(self._rewrite_prefixes):
            path = rewrite(path, self.rewrites)
        ctx.upstream_path = path
        method = ctx.method
        ctx.is_public = self._public(path, method)
        ctx.brute_force_route = self._brute_force(path, method)
        if self._service_key_routes and self._service_key_routes(path, method):
            return self._service_key(ctx)
        return None

    def _service_key(self, ctx: RequestContext) -> Problem | None:
        """The route needs the service key; closed (403) when no key is configured."""
        if self.service_key is None:
            return Problem(403, "forbidden", "service-key access is closed: no key is configured")
        presented = ctx.headers.get(SERVICE_KEY_HEADER)
        if presented is None or not hmac.compare_digest(
            presented.strip().encode("latin-1"), self.service_key
        ):
            challenge = ("www-authenticate", 'ServiceKey header="X-CP-Registration-Key"')
            return Problem(401, "invalid-service-key", "missing or invalid service key",
                           headers=[challenge])
        ctx.service_key_route = True  # only once the key is proven: auth then skips the JWT
        ctx.identity = Identity(
            subject=SERVICE_ACCOUNT, service_account=SERVICE_ACCOUNT, roles=["service"]
        )
        return None


def build(settings: Settings, deps: Dependencies) -> RoutesStep:
    return RoutesStep(settings)


STEP = PlumbingSpec(name="routes", phase=Phase.INGRESS, build=build)
