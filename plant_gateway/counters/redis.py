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
``P approval:{<approval id>}``          ``1``: this Governor approval was used     approval expiry
                                                                                  + 1 d
======================================  ========================================  ===============

The budget keys share one tag (``{budget}``) because the platform budget is global: one script
checks and charges platform, agent and customer atomically, so that slot is the hot one
(``bench/counters_bench.py``, ``bench/counters_cluster_bench.py`` measure it). The two
backend-written keys are read exactly as the backend names them (prefixes ``REVOKED_PREFIX``
/ ``TOKEN_VERSION_PREFIX``), so they carry no tag and are read with plain GETs, pipelined in
one round trip. An approval is consumed with ``SET … NX EX`` (atomic on its own, no script
needed) and released (a refused request) with ``DEL``. Scripts are loaded at start-up and run
by SHA; a ``NOSCRIPT`` reply (a restarted or failed-over Redis) reloads them once.
Every guard call is an op planned as commands plus a reply parser; ``execute(ops)`` sends the
ops of one request (revocation, token_version, rate limit, quota, budget) in ONE pipeline.

On a standalone Redis (TCP or unix socket, no TLS) the batches go through ``RespChannel``
(``counters.resp``): one connection that pipelines the batches of all concurrent requests,
packed and parsed by hiredis, because redis-py's ``Pipeline`` costs the gateway 5-10x more CPU
per request (numbers in that module). Everything else (script loading, PING, revoke, the CLI
commands, Cluster) uses the redis-py client.

``REDIS_CLUSTER=true`` makes the client ``redis.asyncio.cluster.RedisCluster`` (the URL names
any startup node). Nothing else changes: the cluster pipeline groups the batch's commands by
node and sends one pipeline per node concurrently (one round trip per node involved, in
parallel); every EVALSHA carries its keys, all in one slot (``script_slots`` computes them;
``tests/unit/counters/test_redis.py`` asserts one slot for every op); ``SCRIPT LOAD`` goes
to every primary and a ``NOSCRIPT`` from any node (a failed-over or new primary) reloads the
scripts everywhere and re-sends only the failed commands. A primary that is down makes at least
the ops whose keys it owns (often the whole batch) ``DependencyError``s, so each guard's fail
mode applies; ``check`` pings every primary, so
``/ready`` reports it; the same client recovers when the node (or its replica) is back.
Every Redis error or timeout raises ``DependencyError``; redis-py and the RESP channel reconnect
on the next call, so the gateway recovers by itself when Redis is back.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, assert_never

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from plant_gateway import events
from plant_gateway.backends.base import (
    BudgetCharge,
    BudgetDecision,
    BudgetRequest,
    DependencyError,
    DependencyStatus,
    RateDecision,
)
from plant_gateway.counters.common import (
    Clock,
    Gcra,
    calendar,
    day_ttl,
    make_budget_decision,
    month_ttl,
    to_micro,
)
from plant_gateway.counters.ops import (
    ApprovalConsumeOp,
    ApprovalReleaseOp,
    AuthStateOp,
    BudgetAdjustOp,
    BudgetChargeOp,
    CounterOp,
    DailyQuotaOp,
    RateLimitOp,
    ReleaseQuotaOp,
)
from plant_gateway.counters.resp import RespAddress, RespChannel
from plant_gateway.settings import SettingsError

if TYPE_CHECKING:
    from plant_gateway.settings import Settings

RATE_LUA = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local interval = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - window
if allow_at > now then
  return {0, string.format('%.0f', tat), 0, string.format('%.0f', now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, string.format('%.0f', new_tat), math.floor((now - allow_at) / interval),
        string.format('%.0f', now)}
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

# a refund of one quota unit (never below zero)
RELEASE_LUA = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used > 0 then redis.call('DECR', KEYS[1]) end
return used
"""


@dataclass(frozen=True, slots=True)
class LuaScript:
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


SCRIPTS = {
    "release": LuaScript(RELEASE_LUA),
    "rate": LuaScript(RATE_LUA),
    "quota": LuaScript(QUOTA_LUA),
    "budget": LuaScript(BUDGET_LUA),
    "adjust": LuaScript(ADJUST_LUA),
}
SHAS = {name: script.sha for name, script in SCRIPTS.items()}  # hashed once, not per request


# what a Redis call may raise: RedisClusterException (e.g. no reachable startup node, a key-less
# command) is not a RedisError
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)


class RedisCounters:
    """Counters on one Redis (or a Cluster-compatible layout); see the module docstring."""

    name = "redis"

    def __init__(self, settings: Settings, url: str, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock: Clock = clock or time.time
        # GCRA runs on Redis's clock (TIME in the script) unless a clock is injected (tests):
        # gateways whose clocks or planning lag differ would otherwise refuse within the limit
        self.server_clock = clock is None
        self.prefix = settings.redis_key_prefix
        self.client: aioredis.Redis | RedisCluster = _client(
            url, settings.redis_timeout_s, cluster=settings.redis_cluster
        )
        self.channel: RespChannel | None = resp_channel(self.client, settings.redis_timeout_s)
        self.health = events.dependency("redis")  # one log line per outage and recovery

    # --- Dependency ---------------------------------------------------------------------
    async def start(self) -> None:
        """Load the scripts; an unreachable Redis is not fatal (the guards deny until it is up)."""
        with contextlib.suppress(DependencyError):
            await self._load_scripts()
        if self.channel is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self.channel.connect()

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.client.aclose()

    async def check(self) -> DependencyStatus:
        """PING; on a cluster every primary (one node down already denies its slots' guards)."""
        started = time.perf_counter()
        try:
            if isinstance(self.client, RedisCluster):
                await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
            else:
                await self.client.ping()
        except REDIS_ERRORS as exc:
            return DependencyStatus(self.name, ok=False, detail=type(exc).__name__)
        latency = (time.perf_counter() - started) * 1000
        return DependencyStatus(self.name, ok=True, latency_ms=latency)

    async def _load_scripts(self) -> None:
        try:
            for script in SCRIPTS.values():
                await self.client.script_load(script.source)
        except REDIS_ERRORS as exc:
            self.health.down(type(exc).__name__)
            raise DependencyError(f"redis: {type(exc).__name__}") from None

    # --- plumbing -----------------------------------------------------------------------
    async def _call(self, coro: Any) -> Any:
        try:
            result = await coro
        except REDIS_ERRORS as exc:
            self.health.down(type(exc).__name__)
            raise DependencyError(f"redis: {type(exc).__name__}") from None
        self.health.up()
        return result

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
        return await self._one(AuthStateOp(jti, user_id))  # type: ignore[no-any-return]

    async def rate_limit(self, key: str, limit: int, period_s: float, burst: int) -> RateDecision:
        return await self._one(RateLimitOp(key, limit, period_s, burst))  # type: ignore[no-any-return]

    async def daily_quota(self, key: str, limit: int, now: float | None = None) -> RateDecision:
        return await self._one(DailyQuotaOp(key, limit, now))  # type: ignore[no-any-return]

    async def release_quota(self, key: str, now: float) -> None:
        await self._one(ReleaseQuotaOp(key, now))

    async def budget_charge(self, request: BudgetRequest) -> BudgetDecision:
        return await self._one(BudgetChargeOp(request))  # type: ignore[no-any-return]

    async def budget_adjust(self, charge: BudgetCharge, delta_usd: float) -> None:
        await self._one(BudgetAdjustOp(charge, delta_usd))

    async def approval_consume(self, approval_id: str, ttl_s: int) -> bool:
        return await self._one(ApprovalConsumeOp(approval_id, ttl_s))  # type: ignore[no-any-return]

    async def approval_release(self, approval_id: str) -> None:
        await self._one(ApprovalReleaseOp(approval_id))

    # --- batches: every op is a plan (commands + a reply parser); one pipeline runs them all --
    async def execute(self, ops: Sequence[CounterOp]) -> list[Any]:
        """All ``ops`` in one non-transactional pipeline: ONE round trip.

        No MULTI: the ops touch several hash slots, and each check-and-update is atomic on
        its own (one script, one slot), so Cluster clients may split the pipeline by node. A
        ``NOSCRIPT`` reply (Redis restarted) reloads the scripts and re-sends only the commands
        that failed, so nothing is applied twice.
        """
        plans = [self._plan(op) for op in ops]
        commands = [command for cmds, _ in plans for command in cmds]
        try:
            replies = await self._send(commands) if commands else []
            if any(isinstance(reply, NoScriptError) for reply in replies):
                replies = await self._resend_missing_scripts(commands, replies)
        except (*REDIS_ERRORS, DependencyError) as exc:
            name = type(exc.__cause__ or exc).__name__
            self.health.down(name)
            return [DependencyError(f"redis: {name}") for _ in ops]
        self.health.up()
        results: list[Any] = []
        at = 0
        for cmds, parse in plans:
            results.append(_parsed(parse, replies[at : at + len(cmds)]))
            at += len(cmds)
        return results

    async def _one(self, op: CounterOp) -> Any:
        [result] = await self.execute([op])
        if isinstance(result, DependencyError):
            raise result
        return result

    async def _send(self, commands: list[Command]) -> list[Any]:
        if self.channel is not None:
            return await self.channel.send(commands)
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute(raise_on_error=False))

    async def _resend_missing_scripts(
        self, commands: list[Command], replies: list[Any]
    ) -> list[Any]:
        await self._load_scripts()
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        again = await self._send([commands[i] for i in missing])
        for i, reply in zip(missing, again, strict=True):
            replies[i] = reply
        return replies

    def _plan(self, op: CounterOp) -> Plan:
        """The commands and reply parser of ``op``, by the op's type (the most frequent first)."""
        match op:
            case AuthStateOp():
                return self._plan_auth_state(op.jti, op.user_id)
            case RateLimitOp():
                return self._plan_rate_limit(op.key, op.limit, op.period_s, op.burst)
            case DailyQuotaOp():
                return self._plan_daily_quota(op.key, op.limit, op.now)
            case BudgetChargeOp():
                return self._plan_budget_charge(op.request)
            case BudgetAdjustOp():
                return self._plan_budget_adjust(op.charge, op.delta_usd)
            case ReleaseQuotaOp():
                return self._plan_release_quota(op.key, op.now)
            case ApprovalConsumeOp():
                return self._plan_approval_consume(op.approval_id, op.ttl_s)
            case ApprovalReleaseOp():
                return self._plan_approval_release(op.approval_id)
            case _:
                assert_never(op)

    def _plan_auth_state(self, jti: str | None, user_id: str | None) -> Plan:
        commands: list[Command] = []
        if jti:
            commands.append(("EXISTS", self.settings.revoked_prefix + jti))
        if user_id:
            commands.append(("GET", self.settings.token_version_prefix + user_id))

        def parse(replies: list[Any]) -> tuple[bool, int | None]:
            revoked = bool(replies[0]) if jti else False
            return revoked, (_as_int(replies[-1]) if user_id else None)

        return commands, parse

    def rate_key(self, key: str) -> str:
        return f"{self.prefix}rl:{{{key}}}"

    def _plan_rate_limit(self, key: str, limit: int, period_s: float, burst: int) -> Plan:
        gcra = Gcra(limit, period_s, burst)
        now_us = "" if self.server_clock else int(self.clock() * 1_000_000)
        args = [now_us, gcra.interval, gcra.window]

        def parse(replies: list[Any]) -> RateDecision:
            allowed, tat, remaining, server_now_us = replies[0]
            return rate_decision(gcra, bool(allowed), int(tat), int(remaining), int(server_now_us))

        return [_evalsha("rate", [self.rate_key(key)], args)], parse

    def quota_key(self, key: str, now: float) -> str:
        return f"{self.prefix}q:{{{key}}}:{calendar(now).day}"

    def _plan_daily_quota(self, key: str, limit: int, now: float | None = None) -> Plan:
        at = self.clock() if now is None else now
        reset_s = calendar(at).midnight - at

        def parse(replies: list[Any]) -> RateDecision:
            allowed, used = replies[0]
            if not allowed:
                return RateDecision(False, limit, 0, reset_s, reset_s)
            return RateDecision(True, limit, max(0, limit - int(used)), reset_s)

        command = _evalsha("quota", [self.quota_key(key, at)], [limit, day_ttl(at)])
        return [command], parse

    def _plan_release_quota(self, key: str, now: float) -> Plan:
        return [_evalsha("release", [self.quota_key(key, now)], [])], _none

    def budget_keys(
        self, day: str, month: str, agent: str | None, customer: str | None
    ) -> list[str]:
        base = f"{self.prefix}{{budget}}"
        return [
            f"{base}:platform:{month}",
            f"{base}:agent:{agent or '-'}:{day}",
            f"{base}:customer:{customer or '-'}:{month}",
        ]

    def _plan_budget_charge(self, request: BudgetRequest) -> Plan:
        now = self.clock()
        windows = calendar(now)
        day, month = windows.day, windows.month
        keys = self.budget_keys(day, month, request.agent_id, request.customer_id)
        charge = BudgetCharge(day, month, request.agent_id, request.customer_id, request.cost_usd)

        def parse(replies: list[Any]) -> BudgetDecision:
            allowed, reason, *spent = replies[0]
            spent_micro = [int(s) for s in spent]
            return make_budget_decision(
                request, bool(allowed), str(reason), spent_micro, charge if allowed else None
            )

        return [_evalsha("budget", keys, budget_args(request, now))], parse

    def approval_key(self, approval_id: str) -> str:
        return f"{self.prefix}approval:{{{approval_id}}}"

    def _plan_approval_consume(self, approval_id: str, ttl_s: int) -> Plan:
        command = ("SET", self.approval_key(approval_id), "1", "NX", "EX", max(1, int(ttl_s)))

        def parse(replies: list[Any]) -> bool:
            return replies[0] is not None  # "OK" when set, nil when the key was there

        return [command], parse

    def _plan_approval_release(self, approval_id: str) -> Plan:
        return [("DEL", self.approval_key(approval_id))], _none

    def _plan_budget_adjust(self, charge: BudgetCharge, delta_usd: float) -> Plan:
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
        return [_evalsha("adjust", keys, [to_micro(delta_usd), *ttls])], _none


Command = tuple[Any, ...]
Plan = tuple[list[Command], Callable[[list[Any]], Any]]


def _client(url: str, timeout: float, cluster: bool) -> aioredis.Redis | RedisCluster:
    """A standalone client, or a cluster one (``max_connections`` is then per node)."""
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1),
        "max_connections": 512,
        "decode_responses": True,
    }
    if not cluster:
        return aioredis.from_url(url, **options)
    try:
        return RedisCluster.from_url(url, **options)
    except RedisClusterException as exc:  # a unix socket, a database other than 0
        raise SettingsError(f"REDIS_CLUSTER: {exc}") from None


def script_slots(command: Command) -> set[int]:
    """The cluster slots of an EVALSHA command's keys; a script must touch exactly one."""
    if command[0] != "EVALSHA":
        return set()
    keys = command[3 : 3 + int(command[2])]
    return {key_slot(str(key).encode()) for key in keys}


def _evalsha(name: str, keys: list[str], args: list[Any]) -> Command:
    return ("EVALSHA", SHAS[name], len(keys), *keys, *args)


def resp_channel(client: aioredis.Redis | RedisCluster, timeout: float) -> RespChannel | None:
    """The lean channel for the hot batch on a plain TCP / unix-socket standalone Redis."""
    if isinstance(client, RedisCluster):
        return None
    pool = client.connection_pool
    if pool.connection_class not in (Connection, UnixDomainSocketConnection):
        return None  # TLS (rediss://) or a custom connection: keep redis-py's pipeline
    kwargs = pool.connection_kwargs
    address = RespAddress(
        host=kwargs.get("host", "localhost"),
        port=int(kwargs.get("port", 6379)),
        path=kwargs.get("path"),
        db=int(kwargs.get("db") or 0),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
    )
    return RespChannel(address, timeout)


def _none(replies: list[Any]) -> None:
    return None


def _parsed(parse: Callable[[list[Any]], Any], replies: list[Any]) -> Any:
    """The op's result, or a DependencyError when one of its replies is an error."""
    for reply in replies:
        if isinstance(reply, Exception):
            return DependencyError(f"redis: {type(reply).__name__}")
    try:
        return parse(replies)
    except (TypeError, ValueError, IndexError):
        return DependencyError("redis: unexpected reply")


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
