"""Typed counters ops reach the right backend method, with their fields in the right order.

For the in-process backend (``execute`` / ``execute_now``), the Redis backend (``_plan``) and
the unbatched path (``call``); every kind of op in ``CounterOp`` is covered.
"""

from __future__ import annotations

import asyncio
from typing import Any, get_args

import pytest

from plant_gateway.backends.base import BudgetCharge, BudgetRequest
from plant_gateway.counters import (
    ApprovalConsumeOp,
    ApprovalReleaseOp,
    AuthStateOp,
    BudgetAdjustOp,
    BudgetChargeOp,
    CounterOp,
    DailyQuotaOp,
    RateLimitOp,
    ReleaseQuotaOp,
    call,
)
from plant_gateway.counters.memory import MemoryCounters
from plant_gateway.counters.redis import RedisCounters
from plant_gateway.settings import Settings

NOW = 1_741_953_600.0
REQUEST = BudgetRequest(0.25, 100.0, "agent-1", 5.0)
CHARGE = BudgetCharge("20250314", "202503", "agent-1", None, 0.25)

# (op, the Counters method it stands for, the arguments that method gets)
SAMPLES: list[tuple[CounterOp, str, tuple[Any, ...]]] = [
    (AuthStateOp("jti-1", "user-1"), "auth_state", ("jti-1", "user-1")),
    (RateLimitOp("user:1", 7, 60.0, 3), "rate_limit", ("user:1", 7, 60.0, 3)),
    (DailyQuotaOp("trial:1", 9, NOW), "daily_quota", ("trial:1", 9, NOW)),
    (ReleaseQuotaOp("trial:2", NOW + 1), "release_quota", ("trial:2", NOW + 1)),
    (BudgetChargeOp(REQUEST), "budget_charge", (REQUEST,)),
    (BudgetAdjustOp(CHARGE, -0.25), "budget_adjust", (CHARGE, -0.25)),
    (ApprovalConsumeOp("APR-1", 60), "approval_consume", ("APR-1", 60)),
    (ApprovalReleaseOp("APR-2"), "approval_release", ("APR-2",)),
]
IDS = [method for _, method, _ in SAMPLES]


class Recorder:
    """Stands in for every method of one backend: records (method, args), answers a marker."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def sync(self, method: str) -> Any:
        def record(*args: Any) -> Any:
            self.calls.append((method, args))
            return ("answer of", method)

        return record

    def plan(self, method: str) -> Any:
        def record(*args: Any) -> Any:
            self.calls.append((method, args))
            return [], lambda replies: ("answer of", method)

        return record

    def coroutine(self, method: str) -> Any:
        async def record(*args: Any) -> Any:
            self.calls.append((method, args))
            return ("answer of", method)

        return record


def settings() -> Settings:
    return Settings(plant_backend_url="http://127.0.0.1:9", redis_url="redis://127.0.0.1:9/0")


def test_samples_cover_every_op_and_name_their_method() -> None:
    assert {type(op) for op, _, _ in SAMPLES} == set(get_args(CounterOp))
    assert all(op.kind == method for op, method, _ in SAMPLES)
    for _, method, _ in SAMPLES:  # both backends have the method the op stands for
        assert callable(getattr(MemoryCounters, method))
        assert callable(getattr(RedisCounters, method))


@pytest.mark.parametrize(("op", "method", "args"), SAMPLES, ids=IDS)
def test_memory_backend_runs_the_op_s_method(
    op: CounterOp, method: str, args: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = MemoryCounters(settings(), clock=lambda: NOW)
    recorder = Recorder()
    for _, name, _ in SAMPLES:
        monkeypatch.setattr(backend, f"_{name}", recorder.sync(name))
    assert backend.execute_now([op]) == [("answer of", method)]
    assert asyncio.run(backend.execute([op])) == [("answer of", method)]
    assert recorder.calls == [(method, args), (method, args)]


@pytest.mark.parametrize(("op", "method", "args"), SAMPLES, ids=IDS)
def test_redis_backend_plans_the_op_s_method(
    op: CounterOp, method: str, args: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = RedisCounters(settings(), "redis://127.0.0.1:9/0", clock=lambda: NOW)
    recorder = Recorder()
    for _, name, _ in SAMPLES:
        monkeypatch.setattr(backend, f"_plan_{name}", recorder.plan(name))
    commands, parse = backend._plan(op)
    assert commands == [] and parse([]) == ("answer of", method)
    assert recorder.calls == [(method, args)]


@pytest.mark.parametrize(("op", "method", "args"), SAMPLES, ids=IDS)
def test_call_runs_the_op_s_counters_method(
    op: CounterOp, method: str, args: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = MemoryCounters(settings(), clock=lambda: NOW)
    recorder = Recorder()
    for _, name, _ in SAMPLES:
        monkeypatch.setattr(backend, name, recorder.coroutine(name))
    assert asyncio.run(call(backend, op)) == ("answer of", method)
    assert recorder.calls == [(method, args)]


def test_ops_of_different_kinds_never_compare_equal() -> None:
    assert ApprovalReleaseOp("APR-1") == ApprovalReleaseOp("APR-1")
    assert ApprovalReleaseOp("APR-1") != ApprovalConsumeOp("APR-1", 60)
    assert ReleaseQuotaOp("k", NOW) != DailyQuotaOp("k", 1, NOW)
