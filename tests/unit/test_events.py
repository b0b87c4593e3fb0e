"""Failure and state-change lines: one per transition, throttled when they would flood.

The module's clock is replaced by a counter the test moves (no timing in the assertions).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from plant_gateway import events
from plant_gateway.forwarding.breaker import CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock()
    monkeypatch.setattr(events.time, "monotonic", fake)
    events.reset()
    yield fake
    events.reset()


@pytest.fixture(autouse=True)
def info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="plant_gateway.events")


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, dict[str, object]]]:
    out = []
    for rec in caplog.records:
        if rec.name == "plant_gateway.events":
            fields = {k: v for k, v in rec.__dict__.items()
                      if k in ("dependency", "reason", "failed_calls", "flaps", "suppressed",
                               "kind", "error", "circuit", "previous", "down_s")}
            out.append((rec.levelname, rec.__dict__["event"], fields))
    return out


def test_an_outage_is_one_down_and_one_up_line(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    health = events.dependency("redis")
    for _ in range(50):
        health.down("ConnectionError")
    clock.now += 12.5
    for _ in range(50):
        health.up()
    assert lines(caplog) == [
        ("ERROR", "dependency_down", {"dependency": "redis", "reason": "ConnectionError"}),
        ("WARNING", "dependency_up",
         {"dependency": "redis", "failed_calls": 50, "down_s": 12.5}),
    ]
    assert events.down_dependencies() == []


async def test_a_flapping_dependency_is_one_down_line_per_interval(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    health = events.dependency("policy")
    health.down("timeout")
    health.up()
    for _ in range(20):  # within the interval: held back
        health.down("timeout")
        health.up()
    health.down("timeout")  # still down when the interval ends
    assert [e for _, e, _ in lines(caplog)] == ["dependency_down", "dependency_up"]
    clock.now += events.FAILURE_LOG_INTERVAL_S
    assert health._timer is not None
    health._timer.cancel()
    health._deferred()  # what the loop's timer runs at the end of the interval
    last = lines(caplog)[-1]
    assert last == ("ERROR", "dependency_down",
                    {"dependency": "policy", "reason": "timeout", "flaps": 20})
    await asyncio.sleep(0)


def test_circuit_transitions_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    events.reset()
    breaker = CircuitBreaker("production", threshold=2, reset_s=30.0)
    breaker.failure()
    breaker.success()  # closed again before opening: not a transition
    breaker.failure()
    breaker.failure()  # open
    breaker.failure()  # still open: no line
    breaker.state = breaker.HALF_OPEN  # as allow() does once reset_s passed
    breaker._export()
    breaker.success()
    assert [(level, e, f["circuit"], f["previous"]) for level, e, f in lines(caplog)] == [
        ("ERROR", "circuit_open", "upstream production", "closed"),
        ("WARNING", "circuit_half_open", "upstream production", "open"),
        ("INFO", "circuit_closed", "upstream production", "half_open"),
    ]


def test_upstream_failures_are_throttled_with_a_count(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(30):
        events.upstream_failure("production", "connect")
    events.upstream_failure("production", "timeout")  # another kind: its own line
    clock.now += events.FAILURE_LOG_INTERVAL_S
    events.upstream_failure("production", "connect", "ConnectError")
    assert lines(caplog) == [
        ("WARNING", "upstream_failure", {"kind": "connect"}),
        ("WARNING", "upstream_failure", {"kind": "timeout"}),
        ("WARNING", "upstream_failure",
         {"kind": "connect", "error": "ConnectError", "suppressed": 29}),
    ]
