"""Unit tests of route patterns (plant_gateway.routing): exact, anchored prefix, one-segment ``*``.

Methods limit a pattern, nothing matches by suffix, and a bad pattern stops start-up.
"""

from __future__ import annotations

import pytest

from plant_gateway import routing
from plant_gateway.settings import Settings


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [("/api/v1/auth/login", "/api/v1/auth/login", True),
     ("/api/v1/auth/login", "/api/v1/auth/login/x", False),
     ("/api/v1/auth/login", "/x/api/v1/auth/login", False),
     ("/docs", "/api/v1/agents/docs", False),
     ("/api/v1/auth/otp/*", "/api/v1/auth/otp/send", True),
     ("/api/v1/auth/otp/*", "/api/v1/auth/otp", True),
     ("/api/v1/auth/otp/*", "/api/v1/auth/otpx", False),
     ("/api/v1/otp/sessions*", "/api/v1/otp/sessions/1", True)],
)
def test_match_route_exact_or_anchored_prefix_never_suffix(pattern, path, expected) -> None:
    assert routing.match_route(pattern, path) is expected


@pytest.mark.parametrize(
    ("pattern", "method", "path", "expected"),
    [
        ("/api/v1/hired-agents/*/finalize", "POST", "/api/v1/hired-agents/h-1/finalize", True),
        ("/api/v1/hired-agents/*/finalize", "POST", "/api/v1/hired-agents/finalize", False),
        ("/api/v1/hired-agents/*/finalize", "POST", "/api/v1/hired-agents/a/b/finalize", False),
        ("/api/v1/hired-agents/*/finalize", "POST", "/x/api/v1/hired-agents/a/finalize", False),
        ("POST /api/v1/x", "POST", "/api/v1/x", True),
        ("POST /api/v1/x", "GET", "/api/v1/x", False),
        ("GET|PUT /api/v1/x/*", "PUT", "/api/v1/x/1", True),
        ("GET /api/v1/x", "HEAD", "/api/v1/x", True),  # a HEAD is a GET without the body
        ("/api/v1/x", "GET", "/api/v1/x/", True),  # one trailing slash tolerated
        ("/api/v1/x", "GET", "/api/v1/x//", False),
    ],
)
def test_route_patterns(pattern: str, method: str, path: str, expected: bool) -> None:
    assert routing.match_route(pattern, path, method) is expected


@pytest.mark.parametrize("bad", ["api/v1/x", "GE1 /x", "POST|/x", "/a*b/c", "/a/b c", "/x*y"])
def test_bad_route_patterns_stop_start_up(bad: str) -> None:
    with pytest.raises(ValueError, match="route"):
        Settings(plant_backend_url="http://b", public_routes=[bad])
