"""Customer enrichment against a real local HTTP backend: cached, only where needed, fail closed.

The backend answers per user id; its request counter proves caching without timing anything.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web

from plant_gateway.backends.enrichment import VALIDATE_PATH
from plant_gateway.backends.keys import create as create_keys
from plant_gateway.counters import create as create_counters
from plant_gateway.deps import Dependencies
from plant_gateway.guards import auth
from plant_gateway.guards.auth import AuthStep
from tests.unit.auth_support import context, mint, settings

TENANT_PATH = "/api/v1/invoices"  # a default tenant-binding route
PLAIN_PATH = "/api/v1/agents"


@dataclass
class Backend:
    # user_id -> (status, body, delay_s)
    answers: dict[str, tuple[int, Any, float]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        user = jwt.decode(token, options={"verify_signature": False})["user_id"]
        self.requests.append(user)
        status, body, delay = self.answers.get(user, (404, {"detail": "no user"}, 0.0))
        if delay:
            await asyncio.sleep(delay)
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(VALIDATE_PATH, self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    srv = Backend()
    await srv.start()
    yield srv
    assert srv.runner is not None
    await srv.runner.cleanup()


_OPEN: list[AuthStep] = []


@pytest.fixture(autouse=True)
async def _close_enrichers() -> AsyncIterator[None]:
    yield
    while _OPEN:
        enricher = _OPEN.pop().enricher
        if enricher is not None:
            await enricher.close()


def build_step(backend_url: str, **overrides: Any) -> AuthStep:
    cfg = settings(plant_backend_url=backend_url, enrichment_timeout_s=0.3, **overrides)
    deps = Dependencies(settings=cfg, counters=create_counters(cfg), flags=None)  # type: ignore[arg-type]
    deps.keys = create_keys(cfg)
    step = auth.GUARD.create(cfg, deps)
    assert isinstance(step, AuthStep) and step.enricher is not None
    assert step.enricher in deps.guard_backends  # closed with the other dependencies
    _OPEN.append(step)
    return step


async def call(step: AuthStep, token: str, path: str = TENANT_PATH) -> tuple[str, str | None]:
    ctx = context(token, path=path)
    problem = await step.run(ctx)
    if problem is not None:
        return f"{problem.status} {problem.kind}", None
    assert ctx.identity is not None
    return "ok", ctx.identity.customer_id


async def test_customer_is_looked_up_once_per_token_on_tenant_routes(backend: Backend) -> None:
    backend.answers["u-1"] = (200, {"customer_id": "cust-1", "email": "ops@acme.test"}, 0.0)
    step = build_step(backend.url)
    token = mint(user_id="u-1")
    assert await call(step, token) == ("ok", "cust-1")
    assert await call(step, token) == ("ok", "cust-1")
    assert await call(step, token, PLAIN_PATH) == ("ok", "cust-1")  # cached answer is reused
    assert backend.requests == ["u-1"]


async def test_concurrent_requests_share_one_lookup(backend: Backend) -> None:
    backend.answers["u-1"] = (200, {"customer_id": "cust-1"}, 0.1)
    step = build_step(backend.url)
    token = mint(user_id="u-1")
    results = await asyncio.gather(*(call(step, token) for _ in range(20)))
    assert set(results) == {("ok", "cust-1")}
    assert backend.requests == ["u-1"]


async def test_no_lookup_on_routes_without_tenant_binding(backend: Backend) -> None:
    step = build_step(backend.url)
    assert await call(step, mint(user_id="u-404"), PLAIN_PATH) == ("ok", None)
    assert backend.requests == []


async def test_no_lookup_when_the_token_names_its_customer(backend: Backend) -> None:
    step = build_step(backend.url)
    assert await call(step, mint(user_id="u-1", customer_id="cust-own")) == ("ok", "cust-own")
    assert backend.requests == []


async def test_answer_nested_under_user_is_understood(backend: Backend) -> None:
    backend.answers["u-2"] = (200, {"valid": True, "user": {"customer_id": 42}}, 0.0)
    assert await call(build_step(backend.url), mint(user_id="u-2")) == ("ok", "42")


@pytest.mark.parametrize("status", [401, 404])
async def test_backend_rejection_is_invalid_token_and_cached(backend: Backend, status: int) -> None:
    backend.answers["u-x"] = (status, {"detail": "nope"}, 0.0)
    step = build_step(backend.url)
    token = mint(user_id="u-x")
    assert await call(step, token) == ("401 invalid-token", None)
    assert await call(step, token) == ("401 invalid-token", None)
    assert len(backend.requests) == 1


@pytest.mark.parametrize(
    "answer",
    [(500, {"detail": "boom"}, 0.0), (200, "<html>", 0.0), (200, ["list"], 0.0),
     (302, {}, 0.0), (200, {"customer_id": "slow"}, 1.0)],
    ids=["500", "not-json", "not-object", "redirect", "timeout"],
)
async def test_backend_failure_is_503_never_open(
    backend: Backend, answer: tuple[int, Any, float]
) -> None:
    backend.answers["u-f"] = answer
    step = build_step(backend.url)
    token = mint(user_id="u-f")
    assert await call(step, token) == ("503 dependency-unavailable", None)
    assert await call(step, token) == ("503 dependency-unavailable", None)
    assert len(backend.requests) == 2  # failures are not cached: the next request retries


async def test_backend_down_is_503() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before use: nothing listens there
    step = build_step(f"http://127.0.0.1:{port}")
    assert await call(step, mint(user_id="u-1")) == ("503 dependency-unavailable", None)


def test_enrichment_off_builds_no_enricher() -> None:
    for overrides in ({"customer_enrichment": False}, {"guards": ["auth", "audit"]}):
        cfg = settings(**overrides)
        deps = Dependencies(settings=cfg, counters=create_counters(cfg), flags=None)  # type: ignore[arg-type]
        step = auth.GUARD.create(cfg, deps)
        assert isinstance(step, AuthStep) and step.enricher is None
