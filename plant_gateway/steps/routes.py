"""Routing: hostile paths (400), path rewrites, public and brute-force routes, service keys.

Routes match exactly or by an anchored prefix (``/x/*``), never by suffix (spec §8).
"""

from __future__ import annotations

import hmac
import re
from typing import TYPE_CHECKING

from plant_gateway.context import Identity, RequestContext
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

SERVICE_KEY_HEADER = "x-cp-registration-key"
SERVICE_ACCOUNT = "cp-registration"
_ENCODED_BAD = ("%2f", "%5c", "%00", "%2e", "%25")
_CONTROL_OR_BACKSLASH = re.compile(r"[\x00-\x1f\x7f\\]")


def match_route(pattern: str, path: str) -> bool:
    """Exact match, or anchored prefix when the pattern ends in ``*``.

    ``/a/*`` also matches ``/a`` itself; nothing ever matches by suffix.
    """
    if not pattern.endswith("*"):
        return path == pattern
    base = pattern[:-1]
    if base.endswith("/") and path == base[:-1]:
        return True
    return path.startswith(base)


def match_any(patterns: list[str], path: str) -> bool:
    return any(match_route(p, path) for p in patterns)


class RouteSet:
    """``match_any`` precompiled: a set of exact paths plus a tuple of anchored prefixes."""

    __slots__ = ("exact", "prefixes")

    def __init__(self, patterns: list[str]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        for pattern in patterns:
            if not pattern.endswith("*"):
                exact.add(pattern)
                continue
            base = pattern[:-1]
            prefixes.append(base)
            if base.endswith("/"):
                exact.add(base[:-1])
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)

    def __call__(self, path: str) -> bool:
        return path in self.exact or path.startswith(self.prefixes)


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
        ctx.is_public = self._public(path)
        ctx.brute_force_route = self._brute_force(path)
        if self._service_key_routes(path):
            return self._service_key(ctx)
        return None

    def _service_key(self, ctx: RequestContext) -> Problem | None:
        """A present key must be right; without one the route needs a token like any other."""
        presented = ctx.headers.get(SERVICE_KEY_HEADER)
        if presented is None:
            return None
        if self.service_key is None:
            return Problem(403, "forbidden", "service-key access is closed: no key is configured")
        if not hmac.compare_digest(presented.encode("latin-1"), self.service_key):
            return Problem(401, "invalid-service-key", "the service key is not valid")
        ctx.service_key_route = True  # only once the key is proven: auth then skips the JWT
        ctx.identity = Identity(
            subject=SERVICE_ACCOUNT, service_account=SERVICE_ACCOUNT, roles=["service"]
        )
        return None


def build(settings: Settings, deps: Dependencies) -> RoutesStep:
    return RoutesStep(settings)
