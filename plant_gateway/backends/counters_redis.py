"""Redis counters (redis-py asyncio): every check-and-update is one Lua script run by EVALSHA.

Key layout (``P`` = ``REDIS_KEY_PREFIX``; ``{...}`` is the Redis Cluster hash tag, so every key
one script touches lives in one slot and the scripts run unchanged on Cluster / Memorystore):

======================================  ========================================  ===============
key                                     value                                     TTL
======================================  ========================================  ===============
``P rl:{<principal>}``                  GCRA theoretical arrival time (µs)        until the bucket
                                        principal = ``user:<id>`` / ``ip:<addr>``  is full again
                                        / ``bf:<addr>`` (login/OTP/refresh)        (+1 s)
``P q:{<principal>}:<YYYYMMDD>``        trial tasks counted this UTC day          to day end + 1 d
``P {budget}:platform:<YYYYMM>``        platform spend this UTC month (µUSD)      month end + 1 d
``P {budget}:agent:<id>:<YYYYMMDD>``    agent spend this UTC day (µUSD)           day end + 1 d
``P {budget}:customer:<id>:<YYYYMM>``   customer spend this UTC month (µUSD)      month end + 1 d
``revoked_access:<jti>``                written by the backend or the CLI         token ``exp``
``token_version:<user_id>``             written by the backend or the CLI         none
======================================  ========================================  ===============

The budget keys share one tag (``{budget}``) because the platform budget is global: one script
checks and charges platform, agent and customer atomically, so that slot is the hot one
(``bench/counters_bench.py`` measures it). The two backend-written keys are read exactly as the
backend names them (prefixes ``REVOKED_PREFIX`` / ``TOKEN_VERSION_PREFIX``), so they carry no
tag and are read with plain GETs, pipelined in one round trip. Scripts are loaded at start-up
and run by SHA; a ``NOSCRIPT`` reply (a restarted or failed-over Redis) reloads them once.
Every Redis error or timeout raises ``DependencyError``; redis-py reconnects on the next call,
so the gateway recovers by itself when Redis is back.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from plant_gateway.backends.base import (
    BudgetCharge,
    BudgetDecision,
    BudgetRequest,
    DependencyError,
    DependencyStatus,
    RateDecision,
)
from plant_gateway.backends.counters import (
    Clock,
    Gcra,
    day_ttl,
    month_ttl,
    next_utc_midnight,
    to_micro,
    utc_day,
    utc_month,
)
from plant_gateway.backends.counters_memory import make_budget_decision

if TYPE_CHECKING:
    from plant_gateway.settings import Settings

RATE_LUA = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - window
if allow_at > now then
  return {0, string.format('%.0f', tat), 0}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, string.format('%.0f', new_tat), math.floor((now - allow_at) / interval)}
"""

QUOTA_LUA = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then return {0, used} end
used = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {1, used}
"""

# ARGV: cost, platform critical, agent critical|'', customer critical|'', platform high,
#       privileged, override, month ttl, day ttl   (money in micro-dollars)
BUDGET_LUA = """
local cost = tonumber(ARGV[1])
local has_a, has_c = ARGV[3] ~= '', ARGV[4] ~= ''
local p = tonumber(redis.call('GET', KEYS[1]) or '0')
local a, c = 0, 0
if has_a then a = tonumber(redis.call('GET', KEYS[2]) or '0') end
if has_c then c = tonumber(redis.call('GET', KEYS[3]) or '0') end
if ARGV[7] ~= '1' then
  if p + cost > tonumber(ARGV[2]) then return {0, 'platform', p, a, c} end
  if has_a and a + cost > tonumber(ARGV[3]) then return {0, 'agent', p, a, c} end
  if has_c and c + cost > tonumber(ARGV[4]) then return {0, 'customer', p, a, c} end
end
if ARGV[6] ~= '1' and p >= tonumber(ARGV[5]) then return {0, 'platform-high', p, a, c} end
p = redis.call('INCRBY', KEYS[1], cost)
redis.call('EXPIRE', KEYS[1], ARGV[8])
if has_a then a = redis.call('INCRBY', KEYS[2], cost); redis.call('EXPIRE', KEYS[2], ARGV[9]) end
if has_c then c = redis.call('INCRBY', KEYS[3], cost); redis.call('EXPIRE', KEYS[3], ARGV[8]) end
return {1, '', p, a, c}
"""

# KEYS: the charged keys; ARGV: delta, then one ttl per key
ADJUST_LUA = """
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[1])
  redis.call('EXPIRE', key, ARGV[i + 1])
end
return #KEYS
"""


@dataclass(frozen=True, slots=True)
class LuaScript:
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


SCRIPTS = {
    "rate": LuaScript(RATE_LUA),
    "quota": LuaScript(QUOTA_LUA),
    "budget": LuaScript(BUDGET_LUA),
    "adjust": LuaScript(ADJUST_LUA),
}


class RedisCounters:
    """Counters on one Redis (or a Cluster-compatible layout); see the module docstring."""

    name = "redis"

    def __init__(self, settings: Settings, url: str, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or time.time
        self.prefix = settings.redis_key_prefix
        timeout = settings.redis_timeout_s
        self.client: aioredis.Redis = aioredis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
            max_connections=512,
            decode_responses=True,
        )

    # --- Dependency ---------------------------------------------------------------------
    async def start(self) -> None:
        """Load the scripts; an unreachable Redis is not fatal (the guards deny until it is up)."""
        with contextlib.suppress(DependencyError):
            await self._load_scripts()

    async def close(self) -> None:
        await self.client.aclose()

    async def check(self) -> DependencyStatus:
        started = time.perf_counter()
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            return DependencyStatus(self.name, ok=False, detail=type(exc).__name__)
        latency = (time.perf_counter() - started) * 1000
        return DependencyStatus(self.name, ok=True, latency_ms=latency)

    async def _load_scripts(self) -> None:
        try:
            for script in SCRIPTS.values():
                await self.client.script_load(script.source)
        except (RedisError, OSError) as exc:
            raise DependencyError(f"redis: {type(exc).__name__}") from None

    # --- plumbing -----------------------------------------------------------------------
    async def _eval(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = SCRIPTS[name]
        try:
            try:
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._load_scripts()
                return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            raise DependencyError(f"redis: {type(exc).__name__}") from None

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise DependencyError(f"redis: {type(exc).__name__}") from None

    # --- revocation and session invalidation -----------------------------------------------
    async def is_revoked(self, jti: str) -> bool:
        return bool(await self._call(self.client.exists(self.settings.revoked_prefix + jti)))

    async def revoke(self, jti: str, ttl_s: int) -> None:
        key = self.settings.revoked_prefix + jti
        await self._call(self.client.set(key, "1", ex=max(1, int(ttl_s))))

    async def token_version(self, user_id: str) -> int | None:
        value = await self._call(self.client.get(self.settings.token_version_prefix + user_id))
        return _as_int(value)

    async def bump_token_version(self, user_id: str) -> int:
        return int(await self._call(self.client.incr(self.settings.token_version_prefix + user_id)))

    async def auth_state(self, jti: str | None, user_id: str | None) -> tuple[bool, int | None]:
        """Revocation and token_version in one pipelined round trip (no transaction: two slots)."""
        if not jti and not user_id:
            return False, None
        pipe = self.client.pipeline(transaction=False)
        if jti:
            pipe.exists(self.settings.revoked_prefix + jti)
        if user_id:
            pipe.get(self.settings.token_version_prefix + user_id)
        results = await self._call(pipe.execute())
        revoked = bool(results[0]) if jti else False
        version = _as_int(results[-1]) if user_id else None
        return revoked, version

    # --- rate limit and quota -------------------------------------------------------------
    def rate_key(self, key: str) -> str:
        return f"{self.prefix}rl:{{{key}}}"

    async def rate_limit(self, key: str, limit: int, period_s: float, burst: int) -> RateDecision:
        gcra = Gcra(limit, period_s, burst)
        now_us = int(self.clock() * 1_000_000)
        args = [now_us, gcra.interval, gcra.window]
        allowed, tat, remaining = await self._eval("rate", [self.rate_key(key)], args)
        return rate_decision(gcra, bool(allowed), int(tat), int(remaining), now_us)

    async def daily_quota(self, key: str, limit: int) -> RateDecision:
        now = self.clock()
        redis_key = f"{self.prefix}q:{{{key}}}:{utc_day(now)}"
        allowed, used = await self._eval("quota", [redis_key], [limit, day_ttl(now)])
        reset_s = next_utc_midnight(now).timestamp() - now
        if not allowed:
            return RateDecision(False, limit, 0, reset_s, reset_s)
        return RateDecision(True, limit, max(0, limit - int(used)), reset_s)

    # --- budget ---------------------------------------------------------------------------
    def budget_keys(
        self, day: str, month: str, agent: str | None, customer: str | None
    ) -> list[str]:
        base = f"{self.prefix}{{budget}}"
        return [
            f"{base}:platform:{month}",
            f"{base}:agent:{agent or '-'}:{day}",
            f"{base}:customer:{customer or '-'}:{month}",
        ]

    async def budget_charge(self, request: BudgetRequest) -> BudgetDecision:
        now = self.clock()
        day, month = utc_day(now), utc_month(now)
        keys = self.budget_keys(day, month, request.agent_id, request.customer_id)
        allowed, reason, *spent = await self._eval("budget", keys, budget_args(request, now))
        charge = BudgetCharge(day, month, request.agent_id, request.customer_id, request.cost_usd)
        spent_micro = [int(s) for s in spent]
        return make_budget_decision(
            request, bool(allowed), str(reason), spent_micro, charge if allowed else None
        )

    async def budget_adjust(self, charge: BudgetCharge, delta_usd: float) -> None:
        now = self.clock()
        platform, agent, customer = self.budget_keys(
            charge.day, charge.month, charge.agent_id, charge.customer_id
        )
        keys, ttls = [platform], [month_ttl(now)]
        if charge.agent_id:
            keys.append(agent)
            ttls.append(day_ttl(now))
        if charge.customer_id:
            keys.append(customer)
            ttls.append(month_ttl(now))
        await self._eval("adjust", keys, [to_micro(delta_usd), *ttls])


def budget_args(request: BudgetRequest, now: float) -> list[Any]:
    _, high, critical = request.thresholds
    has_agent = request.agent_id is not None and request.agent_limit is not None
    has_customer = request.customer_id is not None and request.customer_limit is not None
    agent_crit = to_micro(request.agent_limit) * critical if has_agent else ""  # type: ignore[arg-type]
    customer_crit = (
        to_micro(request.customer_limit) * critical if has_customer else ""  # type: ignore[arg-type]
    )
    return [
        to_micro(request.cost_usd),
        repr(to_micro(request.platform_limit) * critical),
        repr(agent_crit) if agent_crit != "" else "",
        repr(customer_crit) if customer_crit != "" else "",
        repr(to_micro(request.platform_limit) * high),
        "1" if request.privileged else "0",
        "1" if request.override else "0",
        month_ttl(now),
        day_ttl(now),
    ]


def rate_decision(gcra: Gcra, allowed: bool, tat: int, remaining: int, now_us: int) -> RateDecision:
    if not allowed:
        retry = (tat + gcra.interval - gcra.window - now_us) / 1e6
        return RateDecision(False, gcra.limit, 0, (tat - now_us) / 1e6, max(retry, 0.0))
    return RateDecision(True, gcra.limit, remaining, (tat - now_us) / 1e6)


def _as_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
