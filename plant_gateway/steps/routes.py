"""Routing: hostile paths (400), path rewrites, public and brute-force routes, service keys.

Routes match exactly or by an anchored prefix (``/x/*``), never by suffix (spec §8).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from plant_gateway.context import Identity, RequestContext
from plant_gateway.problems import Problem

if TYPE_CHECKING:
    from plant_gateway.deps import Dependencies
    from plant_gateway.settings import Settings

SERVICE_KEY_HEADER = "x-cp-registration-key"
SERVICE_ACCOUNT = "cp-registration"
_ENCODED_BAD = ("%2f", "%5c", "%00", "%2e", "%25")


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


def hostile_path(path: str, raw_path: str) -> str | None:
    """Why a path is refused (traversal, encoded separators, NUL, not normalised), or None."""
    if not path.startswith("/") or not raw_path.startswith("/"):
        return "path must start with '/'"
    if "\x00" in path or "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "control characters or backslashes in path"
    lowered_raw = raw_path.lower()
    if any(code in lowered_raw for code in _ENCODED_BAD) or any(
        code in path.lower() for code in _ENCODED_BAD
    ):
        return "encoded separators, dots or percent signs in path"
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        return "dot segments in path"
    if "//" in path:
        return "empty segments in path"
    return None


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
        key = settings.cp_registration_key
        self.service_key = key.get_secret_value().encode() if key else None

    async def run(self, ctx: RequestContext) -> Problem | None:
        reason = hostile_path(ctx.path, ctx.scratch.get("raw_path", ctx.path))
        if reason:
            return Problem(400, "bad-request", f"refused path: {reason}")
        ctx.upstream_path = rewrite(ctx.path, self.rewrites)
        path = ctx.upstream_path
        ctx.is_public = match_any(self.public, path)
        ctx.brute_force_route = match_any(self.brute_force, path)
        if match_any(self.service_key_routes, path):
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
