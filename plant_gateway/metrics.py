"""Prometheus metrics of the gateway, one registry for every module.

Other modules add theirs here (or import ``REGISTRY`` and register their own); labels stay
low-cardinality: routes are reduced to their first two path segments.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST
REGISTRY = CollectorRegistry(auto_describe=True)

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter(
    "gateway_requests_total", "Requests handled", ["route", "method", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "gateway_request_duration_seconds", "Total time in the gateway", ["route"],
    buckets=_BUCKETS, registry=REGISTRY,
)
UPSTREAM_LATENCY = Histogram(
    "gateway_upstream_duration_seconds", "Time waiting for the upstream's response head",
    ["upstream"], buckets=_BUCKETS, registry=REGISTRY,
)
POLICY_LATENCY = Histogram(
    "gateway_policy_duration_seconds", "Policy decision time", buckets=_BUCKETS, registry=REGISTRY
)
DENIALS = Counter(
    "gateway_denials_total", "Gateway-made problem responses by kind", ["kind", "status"],
    registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "gateway_circuit_state", "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
    ["upstream"], registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors_total", "Upstream failures by kind", ["upstream", "kind"],
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "gateway_rate_limited_total", "Requests refused by a rate limit", ["tier"], registry=REGISTRY
)
BUDGET_REJECTED = Counter(
    "gateway_budget_rejected_total", "Requests refused by the budget guard", ["scope"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge("gateway_in_flight_requests", "Requests in progress", registry=REGISTRY)


class InFlight:
    """A plain int read by the gauge at scrape time (no lock taken per request)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


IN_FLIGHT_COUNT = InFlight()
IN_FLIGHT.set_function(lambda: IN_FLIGHT_COUNT.value)
GUARD_ACTIVE = Gauge(
    "gateway_guard_active", "1 when a guard is in the pipeline", ["guard"], registry=REGISTRY
)


MAX_ROUTE_LABELS = 256  # distinct route labels kept; later ones are counted as "/other"
_CACHE_LIMIT = 4096
_route_labels: dict[str, str] = {}
_labels_seen: set[str] = set()
_children: dict[tuple[Any, ...], Any] = {}


def _route_label(path: str) -> str:
    parts = [p for p in path.split("/") if p][:2]
    return "/" + "/".join(parts) if parts else "/"


def route_label(path: str) -> str:
    """First two path segments only: ``/api/v1/agents/42`` -> ``/api/v1``.

    Paths come from clients, so the number of distinct labels is capped (memory, scrape size).
    """
    label = _route_labels.get(path)
    if label is not None:
        return label
    label = _route_label(path)
    if label not in _labels_seen:
        if len(_labels_seen) >= MAX_ROUTE_LABELS:
            label = "/other"
        else:
            _labels_seen.add(label)
    if len(_route_labels) >= _CACHE_LIMIT:
        _route_labels.clear()
    _route_labels[path] = label
    return label


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)`` memoised (``labels()`` takes a lock and builds tuples)."""
    key = (metric, *labels)
    found = _children.get(key)
    if found is None:
        if len(_children) >= _CACHE_LIMIT:
            _children.clear()
        found = _children[key] = metric.labels(*labels)
    return found


def render() -> bytes:
    return generate_latest(REGISTRY)
