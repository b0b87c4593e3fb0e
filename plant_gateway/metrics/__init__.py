"""Prometheus metrics of the gateway, one registry for every module.

Other modules add theirs here (or import ``REGISTRY`` and register their own); labels stay
low-cardinality: a route label is the ``METRICS_ROUTES`` pattern a path matches, never the path.
The multi-worker sharing of ``serve --workers N`` is ``metrics.sharing`` (loaded only there).
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
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

from plant_gateway import __version__, routing
from plant_gateway.memo import BoundedMemo

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

    def dump(self) -> dict[str, Any]:
        """The series as compact JSON-able data (a worker's snapshot, see metrics.sharing)."""
        return {"name": self.name, "help": self.documentation, "type": "counter",
                "labelnames": self.labelnames,
                "series": [[k, s.value, s.created] for k, s in list(self.series.items())]}

    @classmethod
    def load(cls, doc: dict[str, Any]) -> LoopCounter:
        metric = cls(doc["name"], doc["help"], doc["labelnames"], CollectorRegistry())
        for values, value, created in doc["series"]:
            series = metric.labels(*values)
            series.value, series.created = value, created
        return metric


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

    def dump(self) -> dict[str, Any]:
        """The series as compact JSON-able data (a worker's snapshot, see metrics.sharing)."""
        return {"name": self.name, "help": self.documentation, "type": "histogram",
                "labelnames": self.labelnames, "bounds": self.bounds,
                "series": [[k, s.counts, s.total, s.created]
                           for k, s in list(self.series.items())]}

    @classmethod
    def load(cls, doc: dict[str, Any]) -> LoopHistogram:
        metric = cls(doc["name"], doc["help"], doc["labelnames"], doc["bounds"],
                     CollectorRegistry())
        for values, counts, total, created in doc["series"]:
            series = metric.labels(*values)
            series.counts, series.total, series.created = list(counts), total, created
        return metric


# Names follow Prometheus' conventions: the plant_gateway_ prefix, base units (seconds, bytes),
# _total on counters (added by the exposition), _seconds on duration histograms. Every label
# has a bounded set of values: routes are the configured METRICS_ROUTES patterns (RouteLabels),
# methods the standard ones, upstreams and guards come from code or configuration, never from
# a client. README → Observability has the table.
REQUESTS = LoopCounter(
    "plant_gateway_requests", "Requests answered, by route pattern, method and status code",
    ["route", "method", "status"], registry=REGISTRY,
)
LATENCY = LoopHistogram(
    "plant_gateway_request_duration_seconds",
    "Time from a request's arrival to its answer's end (gateway and upstream)", ["route"],
    buckets=_BUCKETS, registry=REGISTRY,
)
OVERHEAD = LoopHistogram(
    "plant_gateway_overhead_seconds",
    "Time the gateway itself spent on a request: the total less the upstream wait", ["route"],
    buckets=_BUCKETS, registry=REGISTRY,
)
UPSTREAM_LATENCY = LoopHistogram(
    "plant_gateway_upstream_duration_seconds", "Time waiting for the upstream's response head",
    ["route", "upstream"], buckets=_BUCKETS, registry=REGISTRY,
)
POLICY_LATENCY = LoopHistogram(
    "plant_gateway_policy_duration_seconds", "Policy decision time", [], buckets=_BUCKETS,
    registry=REGISTRY,
).labels()
# guard: the step that refused (auth, rate_limit, policy, budget, tenant, audit, ingress…),
# "proxy" for a problem of the forwarding (upstream down, timeout, body limits) and "gateway"
# for the gateway's own answers (an unknown admin path, an internal error)
DENIALS = LoopCounter(
    "plant_gateway_denials", "Problem responses made by the gateway, by guard and problem kind",
    ["guard", "kind"], registry=REGISTRY,
)
CIRCUIT_STATE = Gauge(
    "plant_gateway_circuit_state", "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
    ["upstream"], registry=REGISTRY,
)
# a breaker that opens and closes between two scrapes still counts here
CIRCUIT_OPENED = Counter(
    "plant_gateway_circuit_opened_total", "Times an upstream's circuit breaker opened",
    ["upstream"], registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "plant_gateway_upstream_errors_total", "Upstream failures by kind", ["upstream", "kind"],
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "plant_gateway_rate_limited_total", "Requests refused by a rate limit", ["tier"],
    registry=REGISTRY,
)
BUDGET_REJECTED = Counter(
    "plant_gateway_budget_rejected_total", "Requests refused by the budget guard", ["scope"],
    registry=REGISTRY,
)
BUDGET_ALERTS = LoopCounter(
    "plant_gateway_budget_alerts",
    "Budget decisions at an alert level (warning, high, critical: BUDGET_ALERT_THRESHOLDS)",
    ["level"], registry=REGISTRY,
)
IN_FLIGHT = Gauge("plant_gateway_requests_in_flight", "Requests in progress", registry=REGISTRY)


class InFlight:
    """A plain number read by a gauge at scrape time (no lock taken per request)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


IN_FLIGHT_COUNT = InFlight()
IN_FLIGHT.set_function(lambda: IN_FLIGHT_COUNT.value)
BUDGET_UTILIZATION = Gauge(
    "plant_gateway_budget_platform_utilization_ratio",
    "Share of the platform's monthly budget spent, as of the last budget decision",
    registry=REGISTRY,
)


class LastValue:
    """A plain float read by a gauge at scrape time (set on the request path, no lock)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


BUDGET_UTILIZATION_VALUE = LastValue()  # set per budget decision (guards/budget.py)
BUDGET_UTILIZATION.set_function(lambda: BUDGET_UTILIZATION_VALUE.value)
# client connections of this worker (its server's set; summed over workers like every gauge)
CLIENT_CONNECTIONS = Gauge(
    "plant_gateway_client_connections", "Open client connections", registry=REGISTRY
)
# connections the gateway closed before a request existed (so without an audit row):
# idle_timeout, header_timeout (answered 408), keepalive_timeout, evicted (room for a newcomer
# at MAX_CONNECTIONS), over_capacity (answered 503: every connection was running a request)
CLIENT_CLOSED = Counter(
    "plant_gateway_client_connections_closed_total",
    "Client connections closed by the gateway's client bounds", ["reason"], registry=REGISTRY,
)
GUARD_ACTIVE = Gauge(
    "plant_gateway_guard_active", "1 when a guard is in the pipeline", ["guard"],
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "plant_gateway_build_info", "Always 1; the gateway's version as a label", ["version"],
    registry=REGISTRY,
)
BUILD_INFO.labels(__version__).set(1)

# The request methods kept as label values; any other (WebDAV, made up) is counted as OTHER.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_ROUTE = "other"  # the label of a path no METRICS_ROUTES pattern matches
_CACHE_LIMIT = 4096
_children: BoundedMemo[tuple[Any, ...], Any] = BoundedMemo(_CACHE_LIMIT)


def method_label(method: str) -> str:
    return method if method in METHODS else "OTHER"


class RouteLabels:
    """The route label of a path: the first ``METRICS_ROUTES`` pattern that matches it.

    Paths come from clients, so a label is never the path itself: a fixed path (an ops route)
    is its own label, a path no pattern matches is ``other``. The patterns are one regex
    alternation (first listed wins); recent paths are cached.
    """

    __slots__ = ("fixed", "labels", "regex", "cache")

    def __init__(self, patterns: Iterable[str], fixed: Iterable[str] = ()) -> None:
        self.fixed = frozenset(fixed)
        self.labels: list[str] = []
        parts: list[str] = []
        for text in patterns:
            pattern = routing.parse(text)
            if pattern.methods is not None or pattern.excluded:
                raise ValueError(f"metrics route {text!r}: no methods or '!' in a metrics route")
            self.labels.append(text.strip())
            parts.append(f"({pattern.regex().pattern[1:-1]})")  # without its ^ and $
        self.regex = re.compile(f"^(?:{'|'.join(parts)})$") if parts else None
        self.cache: BoundedMemo[str, str] = BoundedMemo(_CACHE_LIMIT)

    def __call__(self, path: str) -> str:
        label = self.cache.data.get(path)
        if label is not None:
            return label
        if path in self.fixed:
            label = path
        else:
            found = self.regex.match(path) if self.regex is not None else None
            label = self.labels[found.lastindex - 1] if found and found.lastindex else OTHER_ROUTE
        return self.cache.put(path, label)


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)`` memoised (``labels()`` takes a lock and builds tuples)."""
    key = (metric, *labels)
    found = _children.data.get(key)
    if found is None:
        found = _children.put(key, metric.labels(*labels))
    return found


# Set by metrics.sharing while this worker shares its metrics (serve --workers N > 1): the
# exposition merged over every worker's snapshot.
_shared_render: Callable[[], bytes] | None = None


def render() -> bytes:
    """The exposition of this process, or of all workers when ``serve --workers N`` shares them."""
    if _shared_render is not None:
        return _shared_render()
    return generate_latest(REGISTRY)


# The multi-worker sharing lives in metrics.sharing, imported on first use only: a lone process
# (and every tool that imports this module) never loads it.
def start_sharing() -> None:
    """In a worker of ``serve --workers N``: start snapshotting (no-op for a single process)."""
    from plant_gateway.metrics import sharing

    sharing.start_sharing()


async def stop_sharing() -> None:
    """Stop the periodic snapshot and write the final one (this worker's last counts)."""
    from plant_gateway.metrics import sharing

    await sharing.stop_sharing()
