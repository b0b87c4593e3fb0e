"""When a forward is stopped: its client went away, or the request deadline passed.

The client link (what the HTTP server tells about a request's client) and one timer for the
deadlines of every forward in progress.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

CLIENT_GONE, DEADLINE = "client-disconnected", "deadline-exceeded"  # why a forward was stopped


class ClientLink(Protocol):
    """What the HTTP server tells about a request's client (``http_protocol``'s protocol, in
    the ASGI scope as ``scope["extensions"]["plant.client"]``)."""

    disconnected: bool
    on_disconnect: Callable[[Any], None] | None  # called with the link when the client goes
    task: asyncio.Task[None] | None  # the running request's
    def body_ready(self) -> bool: ...

    def abort(self) -> None: ...  # cut the connection mid-response


class Deadlines:
    """The forwards in progress (their tasks, oldest first, with their deadlines) and one timer
    for the oldest one's deadline; ``stop`` cancels a task while it forwards, never elsewhere.

    Every request has the same deadline after its arrival, so the oldest is due first: one
    timer wakes per deadline period, not one armed and cancelled per request. A forward that
    began late (slow steps) may be stopped up to that lateness after its due. Deadlines are on
    the ``time.perf_counter`` clock of ``RequestContext.started``.
    """

    def __init__(self) -> None:
        self.running: dict[asyncio.Task[Any], float] = {}
        self.stopped: dict[asyncio.Task[Any], str] = {}  # why, until the task has handled it
        self.timer: asyncio.TimerHandle | None = None

    def stop(self, task: asyncio.Task[Any] | None, reason: str) -> None:
        """Cancel ``task`` if it is forwarding (and was not stopped already)."""
        if task in self.running and task not in self.stopped:
            assert task is not None
            self.stopped[task] = reason
            task.cancel()

    def client_gone(self, client: ClientLink) -> None:
        """A client link's ``on_disconnect``: stops its running request if it is forwarding."""
        self.stop(client.task, CLIENT_GONE)

    def arm(self) -> None:
        """The timer, for the deadline of the oldest forward not stopped yet."""
        for task, deadline in self.running.items():
            if task not in self.stopped:
                loop = asyncio.get_running_loop()
                due = max(deadline - time.perf_counter(), 0.0)
                self.timer = loop.call_at(loop.time() + due, self._expire)
                return

    def _expire(self) -> None:
        self.timer = None
        now = time.perf_counter()
        for task, deadline in list(self.running.items()):
            if deadline > now:
                break
            self.stop(task, DEADLINE)
        self.arm()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
