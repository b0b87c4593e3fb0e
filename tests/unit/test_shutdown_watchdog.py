"""The shutdown watchdog: a shutdown that overruns is named and ended before Cloud Run's SIGKILL.

Run in a child interpreter: the watchdog ends its process with ``os._exit``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent("""
    import asyncio, logging, sys
    from plant_gateway.shutdown_watchdog import ShutdownWatchdog

    async def close_on_a_hung_database() -> None:
        await asyncio.Event().wait()  # never set: a close that never returns

    async def main(hang: bool) -> None:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
        watchdog = ShutdownWatchdog(0.5)
        watchdog.start()
        if hang:
            await asyncio.create_task(close_on_a_hung_database(), name="audit-close")
        await asyncio.sleep(0.1)  # a shutdown that ends in time
        watchdog.stop()
        await asyncio.sleep(1.0)  # the process lives on past the budget
        print("finished", flush=True)

    asyncio.run(main(sys.argv[1] == "hang"))
""")


def run(mode: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                          timeout=30)
    return proc, time.monotonic() - started


def test_a_hung_shutdown_is_named_and_ended_at_its_budget() -> None:
    proc, took = run("hang")
    assert proc.returncode == 1 and took < 10
    assert "finished" not in proc.stdout
    line = proc.stderr.strip().splitlines()[-1]
    assert "shutdown overran its 0.5 s budget" in line
    assert "task audit-close:" in line and "close_on_a_hung_database" in line


def test_a_shutdown_that_ends_in_time_is_left_alone() -> None:
    proc, took = run("ok")
    assert proc.returncode == 0, proc.stderr
    assert "finished" in proc.stdout and "overran" not in proc.stderr
    assert took > 1.0  # it outlived the budget
