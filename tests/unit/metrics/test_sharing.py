"""Multi-worker metrics (plant_gateway.metrics.sharing): worker snapshots merged by /metrics,
and `serve` start-up removing metrics-* directories left by a killed serve, never a live one's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from plant_gateway import metrics
from plant_gateway.metrics import LoopCounter, LoopHistogram, sharing
from plant_gateway.metrics.sharing import (
    METRICS_OWNER_FILE,
    UNOWNED_MAX_AGE_S,
    _owner_id,
    remove_stale_metrics_dirs,
)
from tests.unit.metrics.test_metrics import OBSERVATIONS, SHORT_BUCKETS, record

# --- several workers: snapshots merged by /metrics -----------------------------------------


def worker_registry(requests: dict[tuple[str, ...], int], observations: Sequence[float],
                    in_flight: float, circuit: float) -> CollectorRegistry:
    """One worker's metrics: the per-request series and two gauges with different merge rules."""
    registry = CollectorRegistry(auto_describe=True)
    counter = LoopCounter("plant_gateway_requests", "Requests", ["route", "method", "status"],
                          registry=registry)
    for labels, count in requests.items():
        counter.labels(*labels).inc(count)
    record(LoopHistogram("plant_gateway_request_duration_seconds", "Time", ["route"],
                         buckets=SHORT_BUCKETS, registry=registry), {("/api",): observations})
    Gauge("plant_gateway_requests_in_flight", "In flight", registry=registry).set(in_flight)
    Gauge("plant_gateway_circuit_state", "Circuit", ["upstream"], registry=registry
          ).labels("production").set(circuit)
    return registry


def merged_samples(snapshots: list[sharing.Snapshot], live: set[int]
                   ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(sharing._Families(sharing.merge(snapshots, live)))
    text = generate_latest(registry).decode()  # through the exposition and back
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def two_workers() -> list[sharing.Snapshot]:
    first = worker_registry({("/api", "GET", "200"): 3, ("/api", "POST", "502"): 1},
                            [0.1, 0.7, 5], in_flight=2, circuit=0)
    second = worker_registry({("/api", "GET", "200"): 4, ("/x", "GET", "404"): 2},
                             [0.5, 1.5], in_flight=1, circuit=2)
    return [json.loads(json.dumps(sharing.snapshot(first, pid=101))),  # as read from a file
            json.loads(json.dumps(sharing.snapshot(second, pid=102)))]


def test_merge_sums_counters_and_histograms_of_two_workers() -> None:
    samples = merged_samples(two_workers(), live={101, 102})

    def requests(route: str, method: str, status: str) -> float:
        labels = (("method", method), ("route", route), ("status", status))
        return samples[("plant_gateway_requests_total", labels)]

    assert requests("/api", "GET", "200") == 7
    assert requests("/api", "POST", "502") == 1  # only in the first worker
    assert requests("/x", "GET", "404") == 2  # only in the second worker
    bucket = {le: samples[("plant_gateway_request_duration_seconds_bucket",
                           (("le", le), ("route", "/api")))]
              for le in ("0.5", "1.0", "2.0", "+Inf")}
    assert bucket == {"0.5": 2, "1.0": 3, "2.0": 4, "+Inf": 5}  # still cumulative
    route = (("route", "/api"),)
    assert samples[("plant_gateway_request_duration_seconds_count", route)] == 5
    assert samples[("plant_gateway_request_duration_seconds_sum", route)] == pytest.approx(7.8)
    assert samples[("plant_gateway_requests_in_flight", ())] == 3  # summed
    assert samples[("plant_gateway_circuit_state", (("upstream", "production"),))] == 2  # worst


def test_merge_keeps_counts_of_exited_workers_but_not_their_gauges() -> None:
    first, second = two_workers()
    final = {**second, "final": True}
    for snapshots, live in (([first, second], {101}), ([first, final], {101, 102})):
        samples = merged_samples(snapshots, live)

        labels = (("method", "GET"), ("route", "/api"), ("status", "200"))
        assert samples[("plant_gateway_requests_total", labels)] == 7  # never goes backwards
        assert samples[("plant_gateway_request_duration_seconds_count", (("route", "/api"),))] == 5
        assert samples[("plant_gateway_requests_in_flight", ())] == 2  # the live worker's only
        assert samples[("plant_gateway_circuit_state", (("upstream", "production"),))] == 0


def test_created_is_the_earliest_of_the_workers() -> None:
    first, second = two_workers()
    for family in second["families"]:
        for series in family.get("series", []):  # per-request series: [labels, ..., created]
            series[-1] = 1.0  # an older worker
    samples = merged_samples([first, second], live={101, 102})

    labels = (("method", "GET"), ("route", "/api"), ("status", "200"))
    assert samples[("plant_gateway_requests_created", labels)] == 1.0
    assert samples[("plant_gateway_request_duration_seconds_created", (("route", "/api"),))] == 1.0


def test_shared_render_sums_own_live_values_and_other_files(tmp_path: Path) -> None:
    """SharedMetrics.render: writes this worker's file first, then merges every file."""
    other = worker_registry({("/api", "GET", "200"): 5}, [0.1], in_flight=1, circuit=1)
    (tmp_path / "999999999.json").write_text(json.dumps(sharing.snapshot(other, pid=999999999)))
    own = worker_registry({("/api", "GET", "200"): 2}, [0.2], in_flight=4, circuit=0)
    shared = sharing.SharedMetrics(tmp_path, own)

    families = {f.name: f for f in text_string_to_metric_families(shared.render().decode())}

    assert [s.value for s in families["plant_gateway_requests"].samples
            if s.name == "plant_gateway_requests_total"] == [7]
    in_flight = families["plant_gateway_requests_in_flight"].samples
    assert [s.value for s in in_flight] == [4]  # the other worker's pid is gone
    assert json.loads((tmp_path / f"{os.getpid()}.json").read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["999999999.json", f"{os.getpid()}.json"])  # no temp file left behind


def test_render_without_sharing_is_this_process_only() -> None:
    assert sharing._shared is None
    assert metrics.render() == generate_latest(metrics.REGISTRY)


def test_one_snapshot_merged_alone_is_the_workers_own_exposition() -> None:
    """Round trip through the snapshot (compact Loop* series, stock metrics as samples)."""
    registry = worker_registry({("/api", "GET", "200"): 3, ("/", "HEAD", "404"): 1},
                               OBSERVATIONS[SHORT_BUCKETS], in_flight=2, circuit=1)
    Counter("plant_rows", "Rows", registry=registry).inc(4)
    Histogram("plant_write_seconds", "Write", buckets=SHORT_BUCKETS, registry=registry).observe(1)
    snap = json.loads(json.dumps(sharing.snapshot(registry, pid=7)))
    merged = CollectorRegistry(auto_describe=False)
    merged.register(sharing._Families(sharing.merge([snap], live_pids={7})))

    assert generate_latest(merged) == generate_latest(registry)


# --- leftover snapshot directories ----------------------------------------------------------


def metrics_dir(state_dir: Path, name: str, owner: str | None) -> Path:
    path = state_dir / f"metrics-{name}"
    path.mkdir()
    (path / "123.json").write_text("{}")
    if owner is not None:
        (path / METRICS_OWNER_FILE).write_text(owner)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])  # noqa: S603
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_leftovers_of_dead_serves_go_and_live_ones_stay(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # noqa: S603
    try:
        live_owner = _owner_id(live.pid)
        assert live_owner is not None
        gone = dead_pid()
        dead = metrics_dir(tmp_path, "dead", f"{gone} 1")
        dead_no_start = metrics_dir(tmp_path, "deadpid", str(gone))
        owned = metrics_dir(tmp_path, "live", live_owner)
        owned_by_me = metrics_dir(tmp_path, "me", _owner_id(os.getpid()))
        reused = metrics_dir(tmp_path, "reused", f"{live.pid} 1")  # same pid, other start time
        unowned_old = metrics_dir(tmp_path, "old", None)
        age(unowned_old, UNOWNED_MAX_AGE_S + 60)
        unowned_new = metrics_dir(tmp_path, "new", None)  # a serve between mkdtemp and owner.pid
        empty_owner_new = metrics_dir(tmp_path, "empty", "")
        other = tmp_path / "redis"
        other.mkdir()
        age(other, UNOWNED_MAX_AGE_S + 60)

        removed = remove_stale_metrics_dirs(tmp_path)

        assert sorted(removed) == sorted([dead, dead_no_start, reused, unowned_old])
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted(p.name for p in (owned, owned_by_me, unowned_new,
                                               empty_owner_new, other))
        assert (owned / "123.json").exists()
    finally:
        live.kill()
        live.wait()
    assert remove_stale_metrics_dirs(tmp_path) == [owned]  # its owner has exited now


def test_missing_state_dir_is_not_an_error(tmp_path: Path) -> None:
    assert remove_stale_metrics_dirs(tmp_path / "absent") == []
    assert not (tmp_path / "absent").exists()
