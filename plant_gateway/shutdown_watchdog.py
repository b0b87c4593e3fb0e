"""The last line of a shutdown that hangs: say where it is stuck, then exit.

Cloud Run SIGKILLs an instance 10 s after SIGTERM and logs nothing about what it was doing.
A graceful stop that overruns (a close waiting on a hung database, a task that swallowed its
cancellation) would end there silently, with the rows it was holding. The watchdog is a thread,
started when the lifespan shutdown begins with the time that phase may take; if the phase has
not ended by then, it writes one ERROR line naming every asyncio task still pending and where
each is suspended (plus the threads), flushes the log, and ends the process with exit code 1 —
before the SIGKILL, so the line reaches Cloud Logging. A thread, not a task: the event loop is
the thing that may be stuck.

Reading the loop's tasks from another thread is not thread-safe in general; here the loop is
past its budget and (almost certainly) idle in an await, and a failure to read is reported as
such rather than raised.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import traceback

log = logging.getLogger("plant_gateway.shutdown")

OVERRUN_EXIT_CODE = 1
SLACK_S = 1.0  # over the audit flush's budget: closing the other dependencies, the exporter


class ShutdownWatchdog:
    """``start()`` when shutdown begins, ``stop()`` when it ended in time."""

    def __init__(self, budget_s: float, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.budget_s = budget_s
        self.loop = loop or asyncio.get_running_loop()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="shutdown-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.budget_s):
            return
        stuck = pending_tasks(self.loop) + thread_stacks()
        log.error("shutdown overran its %.1f s budget; exiting now. Still waiting: %s",
                  self.budget_s, " | ".join(stuck) or "nothing visible",
                  extra={"event": "shutdown_overrun", "stuck": stuck})
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(OVERRUN_EXIT_CODE)


def pending_tasks(loop: asyncio.AbstractEventLoop) -> list[str]:
    """``task-name: file:line in function`` for each pending task (its innermost frame)."""
    for _ in range(3):  # the set may change while we read it
        try:
            tasks = list(asyncio.all_tasks(loop))
            break
        except RuntimeError:
            continue
    else:
        return ["(the loop's tasks could not be read)"]
    out = []
    for task in tasks:
        stack = task.get_stack()  # oldest first; the last frames say what it awaits
        where = " < ".join(_frame(f) for f in reversed(stack[-3:])) or "not started"
        out.append(f"task {task.get_name()}: {where}")
    return sorted(out)


def thread_stacks() -> list[str]:
    """``thread name: file:line in function`` for every other thread."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    return [f"thread {names.get(ident, ident)}: {_frame(frame)}"
            for ident, frame in sys._current_frames().items() if ident != me]


def _frame(frame: object) -> str:
    summary = traceback.extract_stack(frame, limit=1)[-1]  # type: ignore[arg-type]
    return f"{summary.filename}:{summary.lineno} in {summary.name}"
