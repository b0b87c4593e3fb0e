"""Prometheus metrics of the gateway, one registry for every module.

Other modules add theirs here (or import ``REGISTRY`` and register their own); labels stay
low-cardinality: routes are reduced to their first two path segments.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = CONTENT_TYPE_LATEST
REGISTRY = CollectorRegistry(auto_describe=True)

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


# --- per-request metrics -------------------------------------------------------------------
# prometheus_client's Counter and Histogram take a threading lock on every inc()/observe()
# (a histogram two: its bucket and its sum) and walk the buckets in Python: ≈ 4 µs per request
# for the four per-request series. They are only ever updated from the event loop's thread,
# so the series below keep plain numbers and prometheus_client reads them at scrape time
# (a custom collector, same exposition as its own types, `_created` included).


class CounterSeries:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramSeries:
    __slots__ = ("bounds", "counts", "total", "created")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le is inclusive: first bound >= value
        self.total += value


class LoopCounter:
    """A labelled counter updated from the event loop only (see above)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.series: dict[tuple[str, ...], CounterSeries] = {}
        registry.register(self)  # type: ignore[arg-type]

    def labels(self, *values: str) -> CounterSeries:
        found = self.series.get(values)
        if found is None:
            found = self.series[values] = CounterSeries()
        return found

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, series in list(self.series.items()):
            family.add_metric(values, series.value, created=series.created)
        yield family


class LoopHistogram:
    """A labelled histogram updated from the event loop only (see above)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self.series: dict[tuple[str, ...], HistogramSeries] = {}
        registry.register(self)  # type: ignore[arg-type]

    def labels(self, *values: str) -> HistogramSeries:
        found = self.series.get(values)
        if found is None:
            found = self.series[values] = HistogramSeries(self.bounds)
        return found

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = [*map(floatToGoString, self.bounds), "+Inf"]
        for values, series in list(self.series.items()):
            cumulative, buckets = 0, []
            for le, count in zip(les, series.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(values), buckets, series.total)
            labels = dict(zip(self.labelnames, values, strict=True))
            family.samples.append(Sample(f"{self.name}_created", labels, series.created))
        yield family


REQUESTS = LoopCounter(
    "gateway_requests", "Requests handled", ["route", "method", "status"], registry=REGISTRY
)
LATENCY = LoopHistogram(
    "gateway_request_duration_seconds", "Total time in the gateway", ["route"],
    buckets=_BUCKETS, registry=REGISTRY,
)
UPSTREAM_LATENCY = LoopHistogram(
    "gateway_upstream_duration_seconds", "Time waiting for the upstream's response head",
    ["upstream"], buckets=_BUCKETS, registry=REGISTRY,
)
POLICY_LATENCY = LoopHistogram(
    "gateway_policy_duration_seconds", "Policy decision time", [], buckets=_BUCKETS,
    registry=REGISTRY,
).labels()
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
