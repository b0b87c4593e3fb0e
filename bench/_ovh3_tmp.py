"""Gateway throughput with the audit step on vs off, in the same run (wrk, alternating rounds).

Usage: .venv/bin/python bench/audit_overhead.py [--rounds 3] [--duration 8] [--connections 32]
Both gateways: one worker, guards auth+tenant (+audit), the demo backend's /fast, PostgreSQL at
DATABASE_URL / 127.0.0.1:5432 (a scratch database), else each gateway's embedded one.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.postgres import (  # noqa: E402
    LOOPBACK_DSN,
    _answers,
    create_database,
    drop_database,
)
from tests.fixtures.processes import (  # noqa: E402
    ROOT,
    Proc,
    mint_token,
    start_backend,
    start_gateway,
)

GUARDS = "auth,tenant"


def wrk(url: str, token: str, seconds: int, connections: int) -> tuple[float, int]:
    out = subprocess.run(  # noqa: S603
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-H", f"Authorization: Bearer {token}",
         url + "/fast"], capture_output=True, text=True, check=True,
    ).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} non-2xx answers:\n{out}")
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    count = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rate, count


def cpu_s(proc: Proc) -> float:
    times = psutil.Process(proc.popen.pid).cpu_times()
    return float(times.user + times.system)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    admin = os.environ.get("DATABASE_URL") or (
        LOOPBACK_DSN if _answers("127.0.0.1", 5432) else None)
    dsn = None
    if admin:
        from plant_gateway import migrations

        dsn = create_database(admin, "pgw_overhead")
        migrations.upgrade(dsn)
    backend = start_backend("production")
    common = {"LOG_LEVEL": "WARNING", "DATABASE_URL": dsn}
    gateways: dict[str, Proc] = {}
    try:
        for name, guards, extra in (("audit off", GUARDS, {}), ("audit on", GUARDS + ",audit", {}), ("no writer", GUARDS + ",audit", {"AUDIT_FLUSH_INTERVAL_S": "600", "AUDIT_BATCH_SIZE": "10000000", "AUDIT_QUEUE_MAX": "10000000"})):
            gateways[name] = start_gateway(
                {**common, **extra, "PLANT_GUARDS": guards,
                 "PLANT_STATE_DIR": tempfile.mkdtemp(prefix="pgw-overhead-")},
                backend_url=backend.url)
        token = mint_token()
        results: dict[str, list[float]] = {name: [] for name in gateways}
        cpu: dict[str, list[float]] = {name: [] for name in gateways}
        for gw in gateways.values():  # warm-up
            wrk(gw.url, token, 2, args.connections)
        for _ in range(args.rounds):
            for name, gw in gateways.items():
                before = cpu_s(gw)
                rate, count = wrk(gw.url, token, args.duration, args.connections)
                results[name].append(rate)
                cpu[name].append((cpu_s(gw) - before) / count * 1e6)
        off = statistics.median(results["audit off"])
        on = statistics.median(results["audit on"])
        for name, values in results.items():
            print(f"{name:10s} median {statistics.median(values):8,.0f} req/s  "
                  f"gateway CPU {statistics.median(cpu[name]):6.1f} us/req  "
                  f"rounds {', '.join(f'{v:,.0f}' for v in values)}")
        cpu_off, cpu_on = statistics.median(cpu["audit off"]), statistics.median(cpu["audit on"])
        print(f"audit cost: {(off - on) / off * 100:.1f} % of throughput, "
              f"{(cpu_on - cpu_off) / cpu_off * 100:.1f} % of gateway CPU per request "
              f"(db: {'PostgreSQL ' + admin.split('@')[-1] if admin else 'embedded'})")
    finally:
        for gw in gateways.values():
            gw.stop()
        backend.stop()
        if dsn:
            drop_database(dsn)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
