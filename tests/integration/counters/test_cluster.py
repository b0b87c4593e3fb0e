"""Redis counters on a real local Redis Cluster (``REDIS_CLUSTER=true``, three primaries).

The factory picks the cluster client; one batch costs one pipeline per node it touches; a
``NOSCRIPT`` (scripts flushed on every node) reloads and applies each op once; an unreachable
cluster, or one primary killed, is a ``DependencyError`` (fail closed) and a failing ``/ready``
check, never an exception, and the same client recovers when the node is back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection

from plant_gateway import counters as counters_factory
from plant_gateway.backends.base import BudgetRequest, DependencyError
from plant_gateway.counters import (
    AuthStateOp,
    BudgetChargeOp,
    CounterOp,
    DailyQuotaOp,
    RateLimitOp,
)
from plant_gateway.counters.redis import RedisCounters, script_slots
from plant_gateway.settings import Settings
from tests.fixtures.redis import RedisClusterProcesses, free_port
from tests.integration.counters.test_redis import make_settings


def cluster_settings(url: str, prefix: str) -> Settings:
    return make_settings(url, prefix, cluster=True, redis_timeout_s=0.3)


@pytest.fixture
async def cluster(redis_cluster_url: str, redis_prefix: str) -> AsyncIterator[RedisCounters]:
    made = counters_factory.create(cluster_settings(redis_cluster_url, redis_prefix))
    assert isinstance(made, RedisCounters)
    await made.start()
    yield made
    await made.close()


@pytest.fixture
def node_writes(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Requests written on real connections, per node port (one write = one round trip)."""
    writes: Counter[int] = Counter()
    original = Connection.send_packed_command

    async def counting(self: Connection, command: Any, check_health: bool = True) -> None:
        writes[self.port] += 1
        await original(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counting)
    return writes


def request_ops(user: str) -> list[CounterOp]:
    budget = BudgetRequest(0.001, 100.0, "agent-c", 1.0, "cust-c", 10.0)
    return [
        AuthStateOp(f"jti-{user}", user),
        RateLimitOp(f"user:{user}", 100, 3600, 10),
        DailyQuotaOp(f"trial:{user}", 10, None),
        BudgetChargeOp(budget),
    ]


def nodes_of(counters: RedisCounters, ops: list[CounterOp]) -> set[int]:
    """Ports of the primaries owning every key the ops' commands touch."""
    client: Any = counters.client
    ports: set[int] = set()
    for op in ops:
        for command in counters._plan(op)[0]:
            slots = script_slots(command) or {client.keyslot(command[1])}
            ports |= {client.nodes_manager.get_node_from_slot(s).port for s in slots}
    return ports


async def test_factory_builds_a_cluster_client_that_is_ready(cluster: RedisCounters) -> None:
    assert isinstance(cluster.client, RedisCluster)
    status = await cluster.check()
    assert status.ok, status.detail
    assert len(cluster.client.get_primaries()) == 3


async def test_one_batch_is_one_pipeline_per_node(
    cluster: RedisCounters, node_writes: Counter[int]
) -> None:
    user = next(f"u{i}" for i in range(200) if len(nodes_of(cluster, request_ops(f"u{i}"))) == 3)
    await cluster.execute(request_ops(user))  # warm: connections to every node
    node_writes.clear()
    results = await cluster.execute(request_ops(user))
    assert not [r for r in results if isinstance(r, Exception)]
    assert results[0] == (False, None) and results[1].allowed and results[2].allowed
    assert results[3].allowed and results[3].agent_spent == pytest.approx(0.002)
    expected = dict.fromkeys(nodes_of(cluster, request_ops(user)), 1)
    assert dict(node_writes) == expected  # one pipeline write to each of the 3 nodes


async def test_noscript_on_every_node_reloads_and_applies_once(
    cluster: RedisCounters, redis_cluster_url: str
) -> None:
    ops = request_ops("u-noscript")
    first = await cluster.execute(ops)
    assert first[3].allowed
    for node in cluster.client.get_primaries():  # type: ignore[union-attr]
        with redis.Redis(host=str(node.host), port=int(node.port)) as plain:
            plain.script_flush()
    again = await cluster.execute(ops)
    assert not [r for r in again if isinstance(r, Exception)]
    assert again[1].remaining == first[1].remaining - 1
    assert again[2].remaining == first[2].remaining - 1
    assert again[3].agent_spent == pytest.approx(first[3].agent_spent + 0.001)


async def test_unreachable_cluster_is_a_dependency_error(redis_prefix: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    counters = RedisCounters(cluster_settings(url, redis_prefix), url)
    await counters.start()  # not fatal: the guards deny until the cluster is up
    try:
        results = await counters.execute(request_ops("u-down"))
        assert all(isinstance(r, DependencyError) for r in results)
        with pytest.raises(DependencyError):
            await counters.rate_limit("user:u-down", 1, 1, 0)
        assert not (await counters.check()).ok
    finally:
        await counters.close()


async def test_a_killed_primary_fails_closed_then_recovers(redis_prefix: str) -> None:
    own = RedisClusterProcesses()  # not the session cluster: this test kills a node
    own.start()
    try:
        counters = RedisCounters(cluster_settings(own.url, redis_prefix), own.url)
        await counters.start()
        ops = request_ops("u-outage")
        assert not [r for r in await counters.execute(ops) if isinstance(r, Exception)]
        client: Any = counters.client
        hot = client.nodes_manager.get_node_from_slot(client.keyslot(f"{redis_prefix}{{budget}}"))
        index = own.ports.index(hot.port)
        own.procs[index].kill()
        own.procs[index].wait()
        on_dead = [hot.port in nodes_of(counters, [op]) for op in ops]
        assert on_dead[3]
        for _ in range(2):  # a broken connection, then a refused one (may fail the whole batch)
            down = await counters.execute(ops)
            failed = [isinstance(r, DependencyError) for r in down]
            assert all(f for f, dead in zip(failed, on_dead, strict=True) if dead)
        assert not (await counters.check()).ok
        own.procs[index] = own._spawn(hot.port)  # same nodes.conf: same id, same slots
        own._wait_ping(hot.port)
        own._wait_state_ok()
        again = await counters.execute(ops)
        assert not [r for r in again if isinstance(r, Exception)]  # no restart of the client
        assert again[3].agent_spent == pytest.approx(0.001)  # the budget node lost its data
        assert (await counters.check()).ok
        await counters.close()
    finally:
        own.stop()
