"""`serve --workers 2`: every /metrics scrape returns the totals over both workers.

Real processes over HTTP (demo backend, ``plant-gateway serve``, its embedded redis-server).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.processes import Proc

ROUTE = "/api/v1/*"  # the METRICS_ROUTES pattern every request of a round matches
PATTERNS = {"METRICS_ROUTES": ROUTE}
ROUND = 100  # requests per round, each on a fresh connection so that both workers accept some
MAX_ROUNDS = 10
CONNECTIONS = 8
WAIT_S = 15.0  # many snapshot intervals (1 s)


async def send_round(url: str) -> list[int]:
    connector = aiohttp.TCPConnector(limit=CONNECTIONS, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            async with session.get(f"{url}/api/v1/things?i={i}") as response:
                await response.read()
                return response.status

        return list(await asyncio.gather(*(one(i) for i in range(ROUND))))


def scrape_requests(url: str) -> float:
    """``plant_gateway_requests_total`` summed over every series of ROUTE, from one scrape."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:  # noqa: S310
        text = resp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "plant_gateway_requests_total" and s.labels.get("route") == ROUTE)


def per_worker_requests(state_dir: Path) -> dict[int, float]:
    """ROUTE's request count in each worker's snapshot file (metrics-*/<pid>.json)."""
    counts: dict[int, float] = {}
    for path in state_dir.glob("metrics-*/*.json"):
        snap = json.loads(path.read_text())
        family = next(f for f in snap["families"] if f["name"] == "plant_gateway_requests")
        route = family["labelnames"].index("route")  # series: [label values, value, created]
        counts[snap["pid"]] = sum(value for values, value, _ in family["series"]
                                  if values[route] == ROUTE)
    return counts


def wait_for(check: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


def test_two_workers_scrape_returns_totals_of_both(
    backend: Proc, gateway_factory: Callable[..., Proc], tmp_path: Path,
) -> None:
    env: dict[str, str | None] = {"PLANT_GUARDS": "tenant", "REDIS_URL": None,
                                  "PLANT_STATE_DIR": str(tmp_path), **PATTERNS}
    gateway = gateway_factory(env=env, backend=backend, args=["--workers", "2"])
    sent = 0
    for _ in range(MAX_ROUNDS):  # until both workers have served some (accept() decides)
        statuses = asyncio.run(send_round(gateway.url))
        assert statuses == [200] * ROUND, gateway.output()[-2000:]
        sent += ROUND
        if wait_for(lambda: len([c for c in per_worker_requests(tmp_path).values() if c]) == 2,
                    timeout=3):
            break
    workers = per_worker_requests(tmp_path)
    assert len(workers) == 2 and all(workers.values()), (workers, gateway.output()[-2000:])

    seen: list[float] = []

    def scraped_total() -> bool:
        seen.append(scrape_requests(gateway.admin_url))
        return seen[-1] == sent

    assert wait_for(scraped_total), (sent, seen)
    for _ in range(6):  # whichever worker answers, the total stays exact
        seen.append(scrape_requests(gateway.admin_url))
    assert seen[-6:] == [sent] * 6, (sent, seen)
    assert seen == sorted(seen), seen  # a counter never goes backwards between scrapes
    assert wait_for(lambda: sum(per_worker_requests(tmp_path).values()) == sent)

    gateway.stop()
    assert not gateway.alive
    assert list(tmp_path.glob("metrics-*")) == []  # serve removes its snapshot directory


def test_one_worker_serves_its_own_counts_without_snapshots(
    backend: Proc, gateway_factory: Callable[..., Proc], tmp_path: Path,
) -> None:
    env: dict[str, str | None] = {"PLANT_GUARDS": "tenant", "PLANT_STATE_DIR": str(tmp_path),
                                  **PATTERNS}
    gateway = gateway_factory(env=env, backend=backend)
    statuses = asyncio.run(send_round(gateway.url))
    assert statuses == [200] * ROUND

    assert scrape_requests(gateway.admin_url) == ROUND  # no waiting: this process's live values
    assert list(tmp_path.glob("metrics-*")) == []


def test_restart_after_sigkill_removes_the_dead_serves_directory(
    backend: Proc, gateway_factory: Callable[..., Proc], tmp_path: Path,
) -> None:
    env: dict[str, str | None] = {"PLANT_GUARDS": "tenant", "REDIS_URL": None,
                                  "PLANT_STATE_DIR": str(tmp_path), **PATTERNS}
    first = gateway_factory(env=env, backend=backend, args=["--workers", "2"])
    assert wait_for(lambda: len(list(tmp_path.glob("metrics-*/*.json"))) == 2), first.output()
    (old,) = tmp_path.glob("metrics-*")
    assert (old / "owner.pid").read_text().split()[0] == str(first.popen.pid)

    os.killpg(first.popen.pid, signal.SIGKILL)  # serve, its workers, its redis: no clean-up
    first.popen.wait(5)
    assert old.exists()

    second = gateway_factory(env=env, backend=backend, args=["--workers", "2"])
    assert not old.exists(), second.output()[-2000:]
    (new,) = tmp_path.glob("metrics-*")  # only the running serve's own directory
    assert (new / "owner.pid").read_text().split()[0] == str(second.popen.pid)
    second.stop()
    assert list(tmp_path.glob("metrics-*")) == []
