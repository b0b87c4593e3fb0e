"""Operational events: one log line per failure or state change, never one line per request.

A dependency (Redis, the remote policy engine, the audit database, JWKS, the OTLP collector)
reports ``down(reason)`` and ``up()``: a line is written on each transition only, and the ``up``
line says how long it was down and how many calls failed meanwhile. Circuit breakers log each
transition. Upstream failures are logged at most once per upstream and kind every
``FAILURE_LOG_INTERVAL_S``; the next line says how many were left out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from typing import Any

log = logging.getLogger("plant_gateway.events")

FAILURE_LOG_INTERVAL_S = 10.0
_BREAKER_LEVELS = {"open": logging.ERROR, "half_open": logging.WARNING, "closed": logging.INFO}


class DependencyHealth:
    """Up/down state of one dependency as its calls see it (see the module docstring).

    ``up()`` costs one attribute test while the dependency is up: call it on every success.
    A dependency that flaps (down, up, down within ``FAILURE_LOG_INTERVAL_S``) writes one down
    line per interval: a down line held back is written when the interval ends if the
    dependency is still down, and the up line of a held-back down is not written at all; the
    next line counts the flaps.
    """

    __slots__ = ("name", "down_since", "failures", "reason", "flaps", "_logged", "_last_line",
                 "_lock", "_timer")

    def __init__(self, name: str) -> None:
        self.name = name
        self.down_since: float | None = None
        self.failures = 0
        self.reason = ""
        self.flaps = 0  # down/up cycles whose lines were held back
        self._logged = False  # whether the current outage's down line was written
        self._last_line = -1e18  # monotonic time of the last down line
        self._lock = threading.Lock()  # the OTLP exporter reports from its own thread
        self._timer: Any = None

    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def down(self, reason: str) -> None:
        with self._lock:
            self.failures += 1
            if self.down_since is not None:
                return
            now = time.monotonic()
            self.down_since, self.reason, self.failures = now, reason, 1
            wait = self._last_line + FAILURE_LOG_INTERVAL_S - now
            self._logged = wait <= 0 or not self._defer(wait)
        if self._logged:
            self._log_down()

    def _defer(self, wait: float) -> bool:
        """Write the held-back down line in ``wait`` s if still down; False without a loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._timer is None:
            self._timer = loop.call_later(wait, self._deferred)
        return True

    def _deferred(self) -> None:
        self._timer = None
        with self._lock:
            due = self.down_since is not None and not self._logged
            self._logged = self._logged or due
        if due:
            self._log_down()

    def _log_down(self) -> None:
        self._last_line = time.monotonic()
        fields: dict[str, Any] = {"event": "dependency_down", "dependency": self.name,
                                  "reason": self.reason}
        if self.flaps:
            fields["flaps"], self.flaps = self.flaps, 0
        log.error("dependency down: %s (%s)", self.name, self.reason, extra=fields)

    def up(self) -> None:
        if self.down_since is None:
            return
        with self._lock:
            since, failures, logged = self.down_since, self.failures, self._logged
            if since is None:
                return
            self.down_since, self.failures, self._logged = None, 0, False
            if not logged:
                self.flaps += 1
                return
        down_s = round(time.monotonic() - since, 3)
        log.warning("dependency up: %s (down %.1f s, %d failed calls)", self.name, down_s,
                    failures, extra={"event": "dependency_up", "dependency": self.name,
                                     "down_s": down_s, "failed_calls": failures})


_health: dict[str, DependencyHealth] = {}


def dependency(name: str) -> DependencyHealth:
    """The process-wide health record of ``name`` (one per dependency name)."""
    found = _health.get(name)
    if found is None:
        found = _health.setdefault(name, DependencyHealth(name))
    return found


def down_dependencies() -> list[str]:
    return sorted(name for name, health in _health.items() if health.is_down)


# --- circuit breakers --------------------------------------------------------------------------

_breaker_states: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def circuit(breaker: Any, name: str, state: str, **fields: Any) -> None:
    """A breaker's state was set: one line when it differs from the last one logged for it.

    A new breaker starts ``closed`` silently.
    """
    last = _breaker_states.get(breaker, "closed")
    _breaker_states[breaker] = state
    if state == last:
        return
    log.log(_BREAKER_LEVELS.get(state, logging.WARNING), "circuit %s: %s (was %s)", state,
            name, last, extra={"event": "circuit_" + state, "circuit": name, "previous": last,
                               **fields})


# --- upstream failures ---------------------------------------------------------------------------

class _Throttle:
    """At most one line per key and interval; counts what it held back."""

    __slots__ = ("last", "held")

    def __init__(self) -> None:
        self.last = -1e18
        self.held = 0


_throttles: dict[tuple[str, ...], _Throttle] = {}


def upstream_failure(upstream: str, kind: str, error: str = "") -> None:
    """A call to ``upstream`` failed (connect, timeout, bad_gateway, stream, retry)."""
    key = (upstream, kind)
    throttle = _throttles.get(key)
    if throttle is None:
        throttle = _throttles.setdefault(key, _Throttle())
    now = time.monotonic()
    if now - throttle.last < FAILURE_LOG_INTERVAL_S:
        throttle.held += 1
        return
    held, throttle.held, throttle.last = throttle.held, 0, now
    fields: dict[str, Any] = {"event": "upstream_failure", "upstream": upstream, "kind": kind}
    if error:
        fields["error"] = error
    if held:
        fields["suppressed"] = held
    more = f" (+{held} more in the last {FAILURE_LOG_INTERVAL_S:.0f} s)" if held else ""
    log.warning("upstream failure: %s %s%s%s", upstream, kind, f" {error}" if error else "",
                more, extra=fields)


def reset() -> None:
    """Forget every state (tests that start several gateways in one process)."""
    _health.clear()
    _throttles.clear()
    _breaker_states.clear()
