"""Multi-worker metrics: with ``serve --workers N`` each worker snapshots its registry to a file
and /metrics merges every worker's file, so a scrape sees the totals whichever worker answers.

Imported only by workers that share (``start_sharing`` in ``plant_gateway.metrics``) and by
``serve`` (the snapshot directory), so ``import plant_gateway.metrics`` stays cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Container, Iterable, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from plant_gateway import metrics
from plant_gateway.metrics import REGISTRY, LoopCounter, LoopHistogram

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
    metrics._shared_render = _shared.render  # /metrics answers for every worker from now on
    _shared.write()
    _shared.task = asyncio.get_running_loop().create_task(_shared.run())


async def stop_sharing() -> None:
    """Stop the periodic snapshot and write the final one (this worker's last counts)."""
    global _shared
    shared, _shared = _shared, None
    metrics._shared_render = None
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
