"""UTC windows, GCRA arithmetic and the counters factory (no store needed).

"Tomorrow" and "next month" at month and year ends; WORKERS > 1 without Redis refuses.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from plant_gateway import counters
from plant_gateway.counters import common
from plant_gateway.counters.memory import MemoryCounters
from plant_gateway.settings import Settings, SettingsError


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("now", "day", "month"),
    [
        (ts(2025, 1, 31, 23, 59), datetime(2025, 2, 1, tzinfo=UTC),
         datetime(2025, 2, 1, tzinfo=UTC)),
        (ts(2024, 2, 29, 12), datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)),
        (ts(2025, 12, 31, 23, 59, 59), datetime(2026, 1, 1, tzinfo=UTC),
         datetime(2026, 1, 1, tzinfo=UTC)),
        (ts(2025, 12, 5), datetime(2025, 12, 6, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)),
    ],
)
def test_next_midnight_and_month(now: float, day: datetime, month: datetime) -> None:
    assert common.next_utc_midnight(now) == day
    assert common.next_utc_month(now) == month
    assert common.day_ttl(now) > 0 and common.month_ttl(now) >= common.day_ttl(now) - 1


def test_gcra_burst_then_steady_rate() -> None:
    gcra = common.Gcra(limit=10, period_s=10, burst=2)
    tat, now = None, 0
    allowed = []
    for _ in range(4):
        ok, tat, _, _, _ = gcra.step(tat, now)
        allowed.append(ok)
    assert allowed == [True, True, True, False]
    ok, _, _, _, retry = gcra.step(tat, now)
    assert not ok and retry == pytest.approx(1.0)
    assert gcra.step(tat, now + 1_000_000)[0]


def test_factory_choices() -> None:
    base = {"plant_backend_url": "http://127.0.0.1:9"}
    assert isinstance(counters.create(Settings(**base)), MemoryCounters)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="WORKERS"):
        counters.create(Settings(workers=2, **base))  # type: ignore[arg-type]
