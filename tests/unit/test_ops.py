"""The public ``/ready``: the status alone, and the dependency checks at most once a second.

The public port is reachable from the internet: a flood of ``/ready`` must not become a flood
of Redis pings, database queries and backend calls, nor name a dependency.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from plant_gateway import ops
from plant_gateway.backends.base import DependencyStatus


class CountingCheck:
    """A dependency whose check takes a moment and counts its calls."""

    name = "counters"

    def __init__(self) -> None:
        self.calls = 0
        self.ok = True

    async def check(self) -> DependencyStatus:
        self.calls += 1
        await asyncio.sleep(0.05)
        return DependencyStatus(self.name, self.ok, True, "redis://secret-host:6379")


class Deps:
    def __init__(self, dep: CountingCheck) -> None:
        self.dep = dep

    def all(self) -> list[Any]:
        return [self.dep]


class NoUpstreams:
    async def checks(self) -> list[DependencyStatus]:
        return []


async def test_concurrent_askers_share_one_run_and_see_no_detail() -> None:
    dep = CountingCheck()
    cache = ops.CachedReadiness()
    answers = await asyncio.gather(*(cache.get(Deps(dep), NoUpstreams(), ["auth"])  # type: ignore[arg-type]
                                     for _ in range(50)))
    assert dep.calls == 1
    assert {(a.status, a.body) for a in answers} == {(200, b'{"status":"ready"}')}
    assert "secret-host" not in json.dumps([a.body.decode() for a in answers])


async def test_the_answer_is_reused_for_a_second_then_checked_again() -> None:
    dep = CountingCheck()
    cache = ops.CachedReadiness()
    deps: Any = Deps(dep)
    assert (await cache.get(deps, NoUpstreams(), [])).status == 200  # type: ignore[arg-type]
    dep.ok = False
    assert (await cache.get(deps, NoUpstreams(), [])).status == 200  # type: ignore[arg-type]
    assert dep.calls == 1
    await asyncio.sleep(ops.READY_CACHE_S + 0.05)
    answer = await cache.get(deps, NoUpstreams(), [])  # type: ignore[arg-type]
    assert (answer.status, answer.body) == (503, b'{"status":"not_ready"}')
    assert dep.calls == 2
