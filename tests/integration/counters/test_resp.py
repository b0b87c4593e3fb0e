"""The lean RESP channel of the counters hot batch (plant_gateway/counters/resp.py) on real Redis.

Many requests' batches pipelined on one connection each get their own replies; a cancelled
request does not shift the others' replies; losing Redis fails every waiting batch, a stuck
Redis times them out, and the next batch reconnects; ``SCRIPT FLUSH`` is recovered from without
applying an op twice; unix socket, AUTH and SELECT work as the URL says; a Redis that stops
answering or reading gets no more batches past a bound (they fail at once, the guards deny with
a 503) and the channel works again once Redis does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import redis
import uvloop

from plant_gateway.backends.base import DependencyError, RateDecision
from plant_gateway.counters import (
    AuthStateOp,
    CounterOp,
    DailyQuotaOp,
    RateLimitOp,
    redis_server_binary,
)
from plant_gateway.counters.redis import SHAS, RedisCounters
from plant_gateway.counters.resp import (
    MAX_UNSENT_BYTES,
    MAX_WAITING_BATCHES,
    RespAddress,
    RespChannel,
    pack,
)
from plant_gateway.guards.rate_limit import RateLimitConfig, RateLimitStep
from plant_gateway.pipeline.counter_batch import CounterBatchStep
from plant_gateway.settings import Settings
from tests.fixtures.redis import RedisServer
from tests.unit.auth_support import context


def settings_for(url: str, prefix: str, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "plant_backend_url": "http://127.0.0.1:9",
        "redis_url": url,
        "redis_key_prefix": prefix,
        "revoked_prefix": f"{prefix}revoked:",
        "token_version_prefix": f"{prefix}tv:",
        "redis_timeout_s": 0.5,
    }
    base.update(kw)
    return Settings(**base)


def version_op(user: str) -> CounterOp:
    return AuthStateOp(None, user)


async def test_concurrent_batches_share_one_connection_and_get_their_own_replies(
    redis_url: str, redis_prefix: str
) -> None:
    s = settings_for(redis_url, redis_prefix)
    with redis.Redis.from_url(redis_url) as plain:
        plain.mset({f"{s.token_version_prefix}u{i}": i for i in range(300)})
    counters = RedisCounters(s, redis_url)
    await counters.start()
    try:
        assert counters.channel is not None
        await counters.execute([version_op("u0")])
        connection = counters.channel.protocol

        async def batch(i: int) -> None:
            ops = [version_op(f"u{i}")] + [version_op(f"u{i + 1}")] * (i % 3)
            results = await counters.execute(ops)
            assert results == [(False, i)] + [(False, i + 1)] * (i % 3)

        await asyncio.gather(*(batch(i) for i in range(299)))
        assert counters.channel.protocol is connection  # all pipelined on the one connection
    finally:
        await counters.close()


async def test_a_cancelled_request_does_not_shift_the_replies_of_the_others(
    redis_url: str, redis_prefix: str
) -> None:
    s = settings_for(redis_url, redis_prefix)
    with redis.Redis.from_url(redis_url) as plain:
        plain.mset({f"{s.token_version_prefix}u{i}": i for i in range(50)})
    counters = RedisCounters(s, redis_url)
    await counters.start()
    try:
        await counters.execute([version_op("u0")])
        tasks = [asyncio.ensure_future(counters.execute([version_op(f"u{i}")])) for i in range(50)]
        await asyncio.sleep(0)  # every batch written, none answered yet
        for task in tasks[::2]:
            task.cancel()
        for i, task in enumerate(tasks):
            if i % 2:
                assert await task == [(False, i)]
        assert await counters.execute([version_op("u7")]) == [(False, 7)]
    finally:
        await counters.close()


async def test_redis_killed_fails_waiting_batches_then_recovers(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    s = settings_for(redis_server.url, redis_prefix, redis_timeout_s=5.0)
    counters = RedisCounters(s, redis_server.url)
    await counters.start()
    try:
        assert (await counters.rate_limit("ip:a", 100, 60, 10)).allowed
        with redis.Redis.from_url(redis_server.url) as plain:
            plain.execute_command("CLIENT", "PAUSE", 10_000)  # the batches below wait
        waiting = [asyncio.ensure_future(counters.execute([version_op("u")])) for _ in range(10)]
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in waiting)
        redis_server.stop()
        for result in await asyncio.gather(*waiting):
            assert isinstance(result[0], DependencyError) and "ConnectionError" in str(result[0])
        with pytest.raises(DependencyError):  # Redis still down: refused on reconnect
            await counters.rate_limit("ip:a", 100, 60, 10)
        redis_server.start()
        decision = await counters.rate_limit("ip:a", 100, 60, 10)  # reconnects by itself
        assert decision.allowed and decision.remaining == 10  # a fresh Redis, a full bucket
    finally:
        await counters.close()


async def test_a_stuck_redis_times_the_batch_out_and_the_next_batch_reconnects(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    s = settings_for(redis_server.url, redis_prefix, redis_timeout_s=0.3)
    counters = RedisCounters(s, redis_server.url)
    await counters.start()
    try:
        await counters.execute([version_op("u")])
        stuck = counters.channel.protocol if counters.channel else None
        with redis.Redis.from_url(redis_server.url) as plain:
            plain.execute_command("CLIENT", "PAUSE", 1_000)
            [result] = await counters.execute([version_op("u")])
            # a TimeoutError, not the answer Redis gives once its 1 s pause ends: the channel
            # gave up after its own 0.3 s timeout
            assert isinstance(result, DependencyError) and "TimeoutError" in str(result)
            plain.execute_command("CLIENT", "UNPAUSE")  # Redis 7.0 holds it until the pause ends
        assert await counters.execute([version_op("u")]) == [(False, None)]
        assert counters.channel is not None and counters.channel.protocol is not stuck
    finally:
        await counters.close()


async def test_script_flush_reloads_the_scripts_and_applies_each_op_once(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    s = settings_for(redis_server.url, redis_prefix)
    counters = RedisCounters(s, redis_server.url)
    await counters.start()
    try:
        with redis.Redis.from_url(redis_server.url) as plain:
            plain.script_flush()
            plain.set(f"{s.token_version_prefix}u", 4)
            ops = [version_op("u"), DailyQuotaOp("trial:u", 5, None),
                   RateLimitOp("ip:b", 100, 60, 10)]
            version, quota, rate = await counters.execute(ops)
            assert version == (False, 4)
            assert isinstance(quota, RateDecision) and quota.allowed and quota.remaining == 4
            assert isinstance(rate, RateDecision) and rate.allowed and rate.remaining == 10
            [quota_key] = plain.keys(f"{redis_prefix}q:*")
            assert plain.get(quota_key) == b"1"  # counted once, not once per send
            assert all(plain.script_exists(*SHAS.values()))
    finally:
        await counters.close()


@pytest.fixture
def unix_redis() -> Iterator[tuple[str, str]]:
    """A Redis on a unix socket only, with a password: (socket path, password)."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no redis-server binary")
    folder = Path(tempfile.mkdtemp(prefix="pg-redis-unix-"))
    socket_path, password = str(folder / "redis.sock"), "s3cret"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", socket_path, "--requirepass", password,
         "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not Path(socket_path).exists():
            assert proc.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.02)
        yield socket_path, password
    finally:
        proc.kill()
        proc.wait(timeout=10)


async def test_unix_socket_auth_and_database_from_the_url(
    unix_redis: tuple[str, str], redis_prefix: str
) -> None:
    path, password = unix_redis
    url = f"unix://:{password}@{path}?db=3"
    counters = RedisCounters(settings_for(url, redis_prefix), url)
    await counters.start()
    try:
        assert counters.channel is not None and counters.channel.address.path == path
        assert (await counters.daily_quota("trial:x", 5)).remaining == 4
        with redis.Redis(unix_socket_path=path, password=password, db=3) as plain:
            assert len(plain.keys(f"{redis_prefix}q:*")) == 1
        wrong = f"unix://:nope@{path}?db=3"
        refused = RedisCounters(settings_for(wrong, redis_prefix), wrong)
        with pytest.raises(DependencyError, match="AuthenticationError"):
            await refused.daily_quota("trial:x", 5)
        await refused.close()
    finally:
        await counters.close()


def test_a_busy_event_loop_is_not_a_redis_timeout(redis_url: str, redis_prefix: str) -> None:
    """Replies that arrived in time but were not read yet (the loop was busy, e.g. a slow
    request handler) must not time the batch out: the deadline check runs after the reads."""

    async def scenario() -> list[Any]:
        s = settings_for(redis_url, redis_prefix, redis_timeout_s=0.2)
        counters = RedisCounters(s, redis_url)
        try:
            await counters.execute([version_op("u")])  # connected
            pending = asyncio.ensure_future(counters.execute([version_op("u")]))
            await asyncio.sleep(0)  # the batch is queued for writing
            await asyncio.sleep(0)  # ... and written
            time.sleep(0.5)  # noqa: ASYNC251 - the loop blocked past the timeout, reply unread
            return await pending
        finally:
            await counters.close()

    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(uvloop.run(scenario())))
    worker.start()
    worker.join(timeout=30)
    assert results == [[(False, None)]]


async def test_a_paused_redis_gets_no_more_than_the_bound_of_waiting_batches(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    s = settings_for(redis_server.url, redis_prefix, redis_timeout_s=30.0)
    with redis.Redis.from_url(redis_server.url) as plain:
        plain.set(f"{s.token_version_prefix}u", 7)
    counters = RedisCounters(s, redis_server.url)
    await counters.start()
    try:
        await counters.execute([version_op("u")])
        assert counters.channel is not None and counters.channel.protocol is not None
        connection = counters.channel.protocol
        extra = 300
        with redis.Redis.from_url(redis_server.url) as plain:
            # Redis 7.0 postpones even CLIENT UNPAUSE: the pause ends by itself
            plain.execute_command("CLIENT", "PAUSE", 3_000, "ALL")
        sent = MAX_WAITING_BATCHES + extra
        tasks = [asyncio.ensure_future(counters.execute([version_op("u")])) for _ in range(sent)]
        for _ in range(3):  # every task has run its first step: refused ones are done
            await asyncio.sleep(0)
        refused = [task.result() for task in tasks if task.done()]
        waiting = [task for task in tasks if not task.done()]
        assert len(waiting) == len(connection.waiters) == MAX_WAITING_BATCHES
        assert len(refused) == extra
        assert all(
            isinstance(r, DependencyError) and str(r) == "redis: ConnectionError"
            for [r] in refused
        )
        # the counter batch step denies such a request with a 503 problem, as for a Redis outage
        limiter = RateLimitStep(RateLimitConfig.from_settings(s), counters)
        limiter.batched = True  # as in a pipeline with a counter batch
        steps: list[Any] = [limiter, CounterBatchStep(counters)]
        ctx = context()
        assert await steps[0].run(ctx) is None  # enqueued on the request's batch
        problem = await steps[1].run(ctx)
        assert problem is not None and problem.status == 503
        assert problem.kind == "dependency-unavailable"
        # the pause ends: every waiting batch gets its own reply, and the channel takes more
        assert all(result == [(False, 7)] for result in await asyncio.gather(*waiting))
        assert await counters.execute([version_op("u")]) == [(False, 7)]
        assert counters.channel.protocol is connection  # no reconnect was needed
    finally:
        await counters.close()


async def _stopped_redis_scenario(server: RedisServer) -> tuple[int, int, int, int]:
    """SIGSTOP Redis and write 256 KiB batches, one per turn of the loop, until one is refused:
    (accepted, refused, the largest write buffer seen, the accepted that were answered)."""
    assert server.proc is not None
    channel = RespChannel(RespAddress(host="127.0.0.1", port=server.port), timeout=60.0)
    big = "x" * (256 << 10)
    batch_size = len(pack([("ECHO", big)]))
    try:
        assert await channel.send([("PING",)]) == ["PONG"]
        connection = channel.protocol
        assert connection is not None and connection.transport is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            accepted: list[asyncio.Future[list[Any]]] = []
            refused, largest = 0, 0
            for _ in range(400):  # at most 100 MiB if nothing were refused
                task = asyncio.ensure_future(channel.send([("ECHO", big)]))
                for _ in range(3):  # sent and flushed: one batch per write
                    await asyncio.sleep(0)
                largest = max(largest, connection.transport.get_write_buffer_size())
                if not task.done():
                    assert not refused, "a batch was queued after one was refused"
                    accepted.append(task)
                    continue
                with pytest.raises(redis.ConnectionError, match="write buffer full"):
                    task.result()
                refused += 1
                if refused == 5:
                    break
            assert largest <= MAX_UNSENT_BYTES + batch_size
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        answered = sum(r == [big] for r in await asyncio.gather(*accepted))
        assert await channel.send([("ECHO", "again")]) == ["again"]
        assert channel.protocol is connection  # the same connection took writes again
        return len(accepted), refused, largest, answered
    finally:
        await channel.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_stopped_redis_bounds_the_write_buffer_and_refuses_new_batches(
    redis_server: RedisServer, loop: Literal["asyncio", "uvloop"]
) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    results: list[tuple[int, int, int, int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                results.append(runner.run(_stopped_redis_scenario(redis_server)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=120)
    if errors:  # a fresh error: pytest fails to format a traceback of another thread (3.11)
        raise AssertionError(f"{loop}: {type(errors[0]).__name__}: {errors[0]}") from None
    [(accepted, refused, largest, answered)] = results
    assert refused == 5  # the next batches after the buffer filled all failed at once
    assert 0 < accepted < 400 and answered == accepted  # none lost, none failed: all answered
    assert largest > MAX_UNSENT_BYTES  # refused past the bound (the kernel's buffer was full)
