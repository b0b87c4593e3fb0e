"""Large bodies stream through in bounded memory, counted in bytes at the far end.

A 1 GiB upload (chunked, no length known in advance) reaches the backend whole; a 100 MiB
download reaches the client whole; the gateway's peak resident memory (VmHWM) grows by a small
fraction of either. An upload past MAX_BODY_BYTES is cut: 413 to the client, and the backend
never gets a complete body (it sees the connection aborted mid-body).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.wire import get_json
from tests.fixtures.processes import Proc, start_gateway, start_misbehaving_backend

MiB = 1024 * 1024
UPLOAD = 1024 * MiB
DOWNLOAD = 100 * MiB
BLOCK = 256 * 1024
MEMORY_GROWTH_MAX = 48 * MiB  # peak RSS growth allowed for either transfer


def peak_rss(proc: Proc) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{proc.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def blocks(total: int) -> AsyncIterator[bytes]:
    block = b"u" * BLOCK
    for _ in range(total // BLOCK):
        yield block


@pytest.fixture(scope="module")
def counting_backend() -> Iterator[Proc]:
    proc = start_misbehaving_backend()  # answers a POST with {"received": <body bytes>}
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def gw(counting_backend: Proc) -> Iterator[Proc]:
    proc = start_gateway({"PLANT_GUARDS": "", "MAX_BODY_BYTES": str(2 * UPLOAD),
                          "UPSTREAM_RETRIES": "0"}, backend_url=counting_backend.url)
    yield proc
    proc.stop()


async def test_a_1_gib_upload_streams_through_whole_in_bounded_memory(gw: Proc) -> None:
    before = peak_rss(gw)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session, \
            session.post(gw.url + "/api/v1/upload", data=blocks(UPLOAD)) as resp:
        assert resp.status == 200
        answer = json.loads(await resp.read())
    assert answer["received"] == UPLOAD
    assert peak_rss(gw) - before < MEMORY_GROWTH_MAX, (before, peak_rss(gw))


async def test_a_100_mib_download_streams_through_whole_in_bounded_memory(
    backend: Proc,
) -> None:
    gw = start_gateway({"PLANT_GUARDS": "", "UPSTREAM_RETRIES": "0"}, backend=backend)
    try:
        before = peak_rss(gw)
        received = 0
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(f"{gw.url}/big?size={DOWNLOAD}") as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(BLOCK):
                received += len(chunk)
        assert received == DOWNLOAD
        assert peak_rss(gw) - before < MEMORY_GROWTH_MAX, (before, peak_rss(gw))
    finally:
        gw.stop()


async def test_an_upload_past_the_cap_is_413_and_never_complete_upstream(
    counting_backend: Proc,
) -> None:
    cap = 8 * MiB
    gw = start_gateway({"PLANT_GUARDS": "", "MAX_BODY_BYTES": str(cap),
                        "UPSTREAM_RETRIES": "0"}, backend_url=counting_backend.url)
    try:
        stats_before = get_json(counting_backend.url + "/stats")
        async with aiohttp.ClientSession() as session:
            try:
                async with session.post(gw.url + "/api/v1/upload",
                                        data=blocks(4 * cap)) as resp:
                    status = resp.status
            except aiohttp.ClientError:
                status = 0  # the gateway may answer and close while we still send
        stats = get_json(counting_backend.url + "/stats")
    finally:
        gw.stop()
    assert status in (413, 0)
    completed = stats["requests"].get("POST /api/v1/upload", 0)
    assert completed == stats_before["requests"].get("POST /api/v1/upload", 0)
