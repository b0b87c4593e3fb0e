"""The Redis audit spool on its own: when it is used (AUDIT_REDIS_SPOOL), and its caps and
order on a real Redis (the machine's or one started for the run; keys under a test prefix)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from plant_gateway.audit.spool_redis import RedisSpool, enabled
from plant_gateway.settings import Settings, SettingsError


def cfg(tmp_path: Path, **values: object) -> Settings:
    given: dict[str, object] = {"redis_url": None, "redis_host": None, **values}
    return Settings(plant_backend_url="http://127.0.0.1:9", state_dir=tmp_path, **given)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "url", "expected"),
    [
        ("auto", None, None),
        ("auto", "redis://10.0.0.3:6379/0", "redis://10.0.0.3:6379/0"),
        ("auto", "EMBEDDED", None),  # dies with the instance: not a durable spool
        ("on", "EMBEDDED", "EMBEDDED"),
        ("off", "redis://10.0.0.3:6379/0", None),
    ],
)
def test_the_redis_spool_is_used_only_with_a_real_redis_unless_told(
    tmp_path: Path, mode: str, url: str | None, expected: str | None
) -> None:
    embedded = f"unix://{tmp_path.resolve()}/counters-123.sock"
    url = embedded if url == "EMBEDDED" else url
    expected = embedded if expected == "EMBEDDED" else expected
    assert enabled(cfg(tmp_path, audit_redis_spool=mode, redis_url=url)) == expected


def test_on_without_a_redis_is_a_clear_start_up_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="AUDIT_REDIS_SPOOL=on needs REDIS_URL"):
        enabled(cfg(tmp_path, audit_redis_spool="on"))


@pytest.fixture
async def client(redis_url: str, redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    conn = aioredis.from_url(redis_url)
    yield conn
    keys = [key async for key in conn.scan_iter(match=f"{redis_prefix}*")]
    if keys:
        await conn.delete(*keys)
    await conn.aclose()


async def test_the_row_cap_holds_under_concurrent_pushes(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """50 instances push 10 rows each at once against a cap of 205: exactly 20 pushes land
    (whole batches, never a part of one), the other 30 are refused and say why."""
    spools = [RedisSpool(client, f"i{n}", prefix=redis_prefix, max_rows=205) for n in range(50)]
    results = await asyncio.gather(*(
        spool.push([b"row %d-%d\t0\n" % (n, i) for i in range(10)])
        for n, spool in enumerate(spools)
    ))
    assert results.count(True) == 20
    assert await client.llen(f"{redis_prefix}{{audit-spool}}:rows") == 200
    refused = [spool for spool, ok in zip(spools, results, strict=True) if not ok]
    assert all(s.error == "full: AUDIT_REDIS_SPOOL_MAX_ROWS=205" for s in refused)


async def test_the_byte_cap_counts_rows_until_they_are_confirmed(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """A batch taken by a replayer still counts against the cap until its write is confirmed;
    confirmed, its bytes are given back and pushes fit again."""
    line = b"x" * 1023 + b"\n"
    spool = RedisSpool(client, "r", prefix=redis_prefix, max_bytes=64 * 1024, batch_size=32)
    assert await spool.push([line] * 64)
    assert not await spool.push([line])  # 64 KiB reached
    assert spool.error == "full: AUDIT_REDIS_SPOOL_MAX_BYTES=65536"
    written: list[int] = []

    async def stuck(lines: list[bytes]) -> int | None:
        written.append(len(lines))
        return None  # the database is down: the batch stays taken

    assert not await spool.replay(stuck, 1)
    spool.retry_at = 0.0  # skip the push backoff
    assert not await spool.push([line])  # the taken batch still counts

    async def stores(lines: list[bytes]) -> int | None:
        written.append(len(lines))
        return len(lines)

    assert await spool.replay(stores, 1)
    assert written == [32, 32]  # the same batch again, before anything newer
    spool.retry_at = 0.0
    assert await spool.push([line] * 32)
    assert spool.error == ""


async def test_replay_takes_rows_oldest_first_and_disk_rows_go_ahead(
    client: aioredis.Redis, redis_prefix: str
) -> None:
    """Batches come back in push order; rows moved from a disk spool (older) go to the head."""
    spool = RedisSpool(client, "r", prefix=redis_prefix, batch_size=4)
    assert await spool.push([b"%d\n" % i for i in range(10, 20)])
    assert await spool.push([b"%d\n" % i for i in range(0, 10)], older=True)
    seen: list[bytes] = []

    async def store(lines: list[bytes]) -> int | None:
        seen.extend(lines)
        return len(lines)

    assert await spool.replay(store, 100)
    assert seen == [b"%d\n" % i for i in range(20)]
    assert spool.pending == 0
