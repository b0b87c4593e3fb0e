"""The circuit breaker of an upstream (plant_gateway.forwarding.breaker): its state cycle."""

from __future__ import annotations

import pytest

from plant_gateway.forwarding.breaker import CircuitBreaker


def test_circuit_breaker_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("plant_gateway.forwarding.breaker.time.monotonic", lambda: now[0])
    breaker = CircuitBreaker("unit", threshold=2, reset_s=5)
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] += 5
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow()  # one probe at a time
    breaker.failure()
    assert breaker.state == "open"
    now[0] += 5
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    breaker = CircuitBreaker("unit-reset", threshold=2, reset_s=5)
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.state == "closed" and breaker.allow()  # not two in a row
