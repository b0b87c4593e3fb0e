"""Unit tests of plant_gateway.deps: the order dependencies start and close in.

A failed start closes what had started (newest first); closing goes on past a failing close.
"""

from __future__ import annotations

from typing import Any

import pytest

from plant_gateway.backends.base import DependencyStatus
from plant_gateway.deps import Dependencies, close_all, start_all
from plant_gateway.settings import Settings


class Recorded:
    """A dependency that writes ``start <name>`` / ``close <name>`` into a shared log."""

    def __init__(self, name: str, log: list[str], fail_start: bool = False,
                 fail_close: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail_start = fail_start
        self.fail_close = fail_close

    async def start(self) -> None:
        self.log.append(f"start {self.name}")
        if self.fail_start:
            raise RuntimeError(f"{self.name} cannot start")

    async def close(self) -> None:
        self.log.append(f"close {self.name}")
        if self.fail_close:
            raise RuntimeError(f"{self.name} cannot close")

    async def check(self) -> DependencyStatus:
        return DependencyStatus(self.name, True, True, "")


def deps_with(log: list[str], **failing: dict[str, bool]) -> Dependencies:
    def dep(name: str) -> Any:
        return Recorded(name, log, **failing.get(name, {}))

    return Dependencies(
        settings=Settings(plant_backend_url="http://127.0.0.1:9"), counters=dep("counters"),
        flags=dep("flags"), policy=dep("policy"), keys=dep("keys"), audit_sink=dep("audit"),
        approvals=None, guard_backends=[dep("enricher")],
    )


async def test_start_in_order_and_close_in_reverse() -> None:
    log: list[str] = []
    deps = deps_with(log)
    await start_all(deps)
    await close_all(deps)
    names = ["counters", "flags", "policy", "keys", "audit", "enricher"]
    assert log == [f"start {n}" for n in names] + [f"close {n}" for n in reversed(names)]


async def test_a_failed_start_closes_only_what_started_newest_first() -> None:
    log: list[str] = []
    deps = deps_with(log, keys={"fail_start": True})
    with pytest.raises(RuntimeError, match="keys cannot start"):
        await start_all(deps)
    assert log == ["start counters", "start flags", "start policy", "start keys",
                   "close policy", "close flags", "close counters"]


async def test_a_failing_close_is_logged_and_the_others_still_close(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    deps = deps_with(log, policy={"fail_close": True})
    await close_all(deps)
    assert log == ["close enricher", "close audit", "close keys", "close policy", "close flags",
                   "close counters"]
    assert [r.getMessage() for r in caplog.records if r.name == "plant_gateway.deps"] == [
        "closing policy failed"]
