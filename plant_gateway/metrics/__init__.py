"""Prometheus metrics of the gateway, one registry for every module.

Other modules add theirs here (or import ``REGISTRY`` and register their own); labels stay
low-cardinality: a route label is the ``METRICS_ROUTES`` pattern a path matches, never the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from pathlib import Path
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
        """The series as compact JSON-able data (a worker's snapshot, see SharedMetrics)."""
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
        """The series as compact JSON-able data (a worker's snapshot, see SharedMetrics)."""
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


BUDGET_UTILIZATION_VALUE = LastValue()  # set per budget decision (steps/budget.py)
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
_children: dict[tuple[Any, ...], Any] = {}


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
        self.cache: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        label = self.cache.get(path)
        if label is not None:
            return label
        if path in self.fixed:
            label = path
        else:
            found = self.regex.match(path) if self.regex is not None else None
            label = self.labels[found.lastindex - 1] if found and found.lastindex else OTHER_ROUTE
        if len(self.cache) >= _CACHE_LIMIT:
            self.cache.clear()
        self.cache[path] = label
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
    """The exposition of this process, or of all workers when ``serve --workers N`` shares them."""
    if _shared is not None:
        return _shared.render()
    return generate_latest(REGISTRY)


# --- several workers -----------------------------------------------------------------------
# With `serve --workers N` (N > 1) a scrape lands on one worker at random. Each worker writes a
# JSON snapshot of its REGISTRY to <METRICS_DIR_ENV>/<pid>.json every SNAPSHOT_INTERVAL_S (and
# at shutdown, marked final); /metrics first rewrites its own snapshot, then merges every file.
# Every value that enters a sum has been written to a file first and each file only grows, so
# consecutive scrapes never see a counter go backwards, whichever worker answers.
# Files of exited workers (final, or a pid that is gone) stay: their counters and histograms
# keep counting in the totals (a restarted worker has a new pid, hence a new file); their gauges
# are dropped. prometheus_client's own multiprocess mode (PROMETHEUS_MULTIPROC_DIR) is not used:
# it writes an mmap on every inc()/observe(), which would put file-backed writes on the
# per-request path; here the request path keeps its plain numbers and the cost is one
# snapshot per worker per second (measured: ≈ 0.3 ms with 20 route labels, ≈ 1.6 ms at the
# 256-label cap).

METRICS_DIR_ENV = "PLANT_METRICS_DIR"  # set by `serve` for its workers when N > 1
SNAPSHOT_INTERVAL_S = 1.0
_SUMMED_TYPES = frozenset({"counter", "histogram", "summary"})
Merge = Callable[[float, float], float]
# How the live workers' values of a gauge combine; any gauge not listed is summed (in-flight
# requests, audit queue depth and spooled rows are per-worker quantities).
GAUGE_MERGE: dict[str, Merge] = {
    "plant_gateway_circuit_state": max,  # each worker has its own breaker: the worst state shows
    "plant_gateway_guard_active": max,  # same configuration in every worker
    "plant_gateway_build_info": max,
    "plant_gateway_budget_platform_utilization_ratio": max,  # the latest is the highest
    "plant_gateway_audit_database_up": min,  # 1 only while every worker's sink writes
    "plant_gateway_audit_spool_writable": min,
    "plant_gateway_audit_refusing": max,  # 1 while any worker refuses requests
    "plant_gateway_audit_redis_spool_rows": max,  # one list shared by every worker and instance
    "plant_gateway_audit_redis_spool_capacity_rows": max,
    "plant_gateway_audit_redis_spool_writable": min,
}
log = logging.getLogger("plant_gateway.metrics")
Snapshot = dict[str, Any]


def snapshot(registry: CollectorRegistry = REGISTRY, pid: int | None = None,
             final: bool = False) -> Snapshot:
    """This process's metric families as plain JSON-able data.

    The per-request Loop* series are dumped as they are kept (label values, numbers), not as
    exposition samples: ≈ 10× cheaper with many routes, and this runs on the event loop.
    """
    with registry._lock:  # no public list of a registry's collectors in prometheus_client
        collectors = list(registry._collector_to_names)
    families: list[dict[str, Any]] = []
    for collector in collectors:
        if isinstance(collector, LoopCounter | LoopHistogram):
            families.append(collector.dump())
            continue
        families.extend(
            {"name": f.name, "help": f.documentation, "type": f.type, "unit": f.unit,
             "samples": [[s.name, s.labels, s.value] for s in f.samples]}
            for f in collector.collect())
    return {"pid": os.getpid() if pid is None else pid, "final": final, "families": families}


def _samples(doc: dict[str, Any]) -> list[list[Any]]:
    """A snapshot family's exposition samples (a dumped Loop* family rebuilt and collected)."""
    if "series" not in doc:
        return list(doc["samples"])
    loader = LoopHistogram.load if doc["type"] == "histogram" else LoopCounter.load
    return [[s.name, s.labels, s.value] for f in loader(doc).collect() for s in f.samples]


def _combine(typ: str, family: str, sample: str) -> Merge | None:
    """How two workers' values of one sample combine; None: the first one seen is kept."""
    if typ in _SUMMED_TYPES:
        return min if sample.endswith("_created") else _add
    if typ == "gauge":
        return GAUGE_MERGE.get(family, _add)
    return None


def _add(a: float, b: float) -> float:
    return a + b


def merge(snapshots: Iterable[Snapshot], live_pids: Container[int]) -> list[Metric]:
    """Totals over workers: counters and histograms of every snapshot, gauges of live ones only.

    A snapshot is live when its pid is in ``live_pids`` and it is not a final (shutdown) one.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]]] = {}
    for snap in snapshots:
        live = not snap.get("final") and snap.get("pid") in live_pids
        for doc in snap["families"]:
            name, typ = doc["name"], doc["type"]
            if name not in families:
                families[name] = Metric(name, doc["help"], typ, doc.get("unit", ""))
                values[name] = {}
            if typ == "gauge" and not live:
                continue
            _merge_samples(values[name], _samples(doc), typ, name)
    for name, family in families.items():
        for sample_name, labels, value in values[name].values():
            family.add_sample(sample_name, labels, value)
    return list(families.values())


def _merge_samples(into: dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]],
                   samples: Iterable[Sequence[Any]], typ: str, family: str) -> None:
    for sample_name, labels, value in samples:
        key = (sample_name, tuple(sorted(labels.items())))
        found = into.get(key)
        if found is None:
            into[key] = [sample_name, labels, float(value)]
            continue
        how = _combine(typ, family, sample_name)
        if how is not None:
            found[2] = how(found[2], float(value))


class _Families:
    """A collector that hands out already merged families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0; another user's process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A serve killed by SIGKILL (or a crash) leaves its metrics-* directory behind; the next start
# removes those whose owner is gone. Several gateways may share one state dir, so a directory is
# removed only when its owner.pid names no live process with the same start time (pid reuse).
METRICS_OWNER_FILE = "owner.pid"  # "<pid> <start time>"; no .json suffix: workers ignore it
# No owner file: a serve between mkdtemp and writing it, or one older than owner files (its
# workers still touch the directory every second); left alone until untouched this long.
UNOWNED_MAX_AGE_S = 600.0


def _owner_id(pid: int) -> str | None:
    """``"<pid> <start time>"`` from /proc/<pid>/stat (boot ticks), None if not readable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # comm (field 2) may hold spaces and parens
    return f"{pid} {fields[19]}" if len(fields) > 19 else None  # field 22: starttime


def _owner_alive(owner: str) -> bool:
    pid_text, _, start = owner.strip().partition(" ")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid <= 0:
        return False
    current = _owner_id(pid)
    if current is not None:
        return not start or current == f"{pid} {start}"
    return pid_alive(pid)  # no /proc (not Linux): existence only


def _metrics_dir_stale(path: Path, now: float) -> bool:
    try:
        owner = (path / METRICS_OWNER_FILE).read_text()
    except FileNotFoundError:
        owner = ""
    except OSError:
        return False
    if owner.strip():
        return not _owner_alive(owner)
    try:  # no owner file, or an empty one (being written)
        return now - path.stat().st_mtime > UNOWNED_MAX_AGE_S
    except OSError:
        return False


def remove_stale_metrics_dirs(state_dir: Path) -> list[Path]:
    """Remove leftover ``metrics-*`` directories of serves no longer running; best effort."""
    removed: list[Path] = []
    try:
        candidates = [p for p in state_dir.glob("metrics-*") if p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    now = time.time()
    for path in candidates:
        if _metrics_dir_stale(path, now):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def create_metrics_dir(state_dir: Path) -> Path:
    """A fresh ``metrics-*`` directory in ``state_dir``, owned by this process; OSError if not."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="metrics-", dir=state_dir)).resolve()
    (path / METRICS_OWNER_FILE).write_text(_owner_id(os.getpid()) or str(os.getpid()))
    return path


class SharedMetrics:
    """One worker's side of the snapshot directory: writes its own file, merges all of them."""

    def __init__(self, directory: Path, registry: CollectorRegistry = REGISTRY) -> None:
        self.directory = directory
        self.registry = registry
        self.pid = os.getpid()
        self.path = directory / f"{self.pid}.json"
        self._tmp = directory / f".{self.pid}.tmp"  # no .json suffix: never read half-written
        self.task: asyncio.Task[None] | None = None

    def write(self, final: bool = False) -> Snapshot:
        """Replace this worker's file atomically; on the event loop only (writes stay ordered)."""
        snap = snapshot(self.registry, self.pid, final)
        self._tmp.write_bytes(json.dumps(snap, separators=(",", ":")).encode())
        os.replace(self._tmp, self.path)
        return snap

    def others(self) -> list[Snapshot]:
        found = []
        for path in self.directory.glob("*.json"):
            if path == self.path:
                continue
            try:
                found.append(json.loads(path.read_bytes()))
            except (OSError, ValueError):
                log.warning("unreadable metrics snapshot", extra={"path": str(path)})
        return found

    def render(self) -> bytes:
        own = self.write()
        snaps = [own, *self.others()]
        live = {s["pid"] for s in snaps if isinstance(s.get("pid"), int) and pid_alive(s["pid"])}
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(merge(snaps, live)))
        return generate_latest(registry)

    async def run(self, interval: float = SNAPSHOT_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.write()
            except OSError:
                log.warning("metrics snapshot not written", exc_info=True)


_shared: SharedMetrics | None = None


def start_sharing() -> None:
    """In a worker of ``serve --workers N``: start snapshotting (no-op for a single process)."""
    global _shared
    directory = os.environ.get(METRICS_DIR_ENV)
    if not directory:
        return
    _shared = SharedMetrics(Path(directory))
    _shared.write()
    _shared.task = asyncio.get_running_loop().create_task(_shared.run())


async def stop_sharing() -> None:
    """Stop the periodic snapshot and write the final one (this worker's last counts)."""
    global _shared
    shared, _shared = _shared, None
    if shared is None:
        return
    if shared.task is not None:
        shared.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await shared.task
    try:
        shared.write(final=True)
    except OSError:
        log.warning("final metrics snapshot not written", exc_info=True)
