"""The circuit breaker of an upstream: stop sending to a backend that keeps failing.

Closed, open after N consecutive failures, half-open (one probe) after the reset time.
"""

from __future__ import annotations

import time

from plant_gateway import events, metrics


class CircuitBreaker:
    """closed -> open after N consecutive failures -> half-open after reset_s (one probe)."""

    CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
    _GAUGE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

    def __init__(self, name: str, threshold: int, reset_s: float) -> None:
        self.name = name
        self.threshold = threshold
        self.reset_s = reset_s
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False
        self._export()

    def _export(self) -> None:
        metrics.CIRCUIT_STATE.labels(self.name).set(self._GAUGE[self.state])
        events.circuit(self, f"upstream {self.name}", self.state, failures=self.failures)

    def allow(self) -> bool:
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN and time.monotonic() - self.opened_at >= self.reset_s:
            self.state = self.HALF_OPEN
            self.probing = False
            self._export()
        if self.state == self.HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def retry_after(self) -> int:
        return max(1, int(self.reset_s - (time.monotonic() - self.opened_at)) + 1)

    def success(self) -> None:
        if self.state != self.CLOSED or self.failures:
            self.state, self.failures, self.probing = self.CLOSED, 0, False
            self._export()

    def failure(self) -> None:
        self.failures += 1
        if self.state == self.HALF_OPEN or self.failures >= self.threshold:
            if self.state != self.OPEN:
                metrics.CIRCUIT_OPENED.labels(self.name).inc()
            self.state, self.opened_at, self.probing = self.OPEN, time.monotonic(), False
            self._export()
