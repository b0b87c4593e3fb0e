"""Prometheus metrics of the audit writer (process-wide; one set per worker process).

``plant_audit_rows_dropped_total`` must stay 0: a row is dropped only if it can be neither
written nor spooled to disk.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from plant_gateway.metrics import REGISTRY  # the registry /metrics serves

QUEUE_DEPTH = Gauge("plant_audit_queue_depth", "Audit rows waiting in memory", registry=REGISTRY)
SPOOL_PENDING = Gauge(
    "plant_audit_spool_pending_rows", "Audit rows on disk awaiting replay", registry=REGISTRY
)
ROWS_WRITTEN = Counter(
    "plant_audit_rows_written_total", "Audit rows written to PostgreSQL", registry=REGISTRY
)
ROWS_SPOOLED = Counter(
    "plant_audit_rows_spooled_total", "Audit rows written to the disk spool", registry=REGISTRY
)
ROWS_REPLAYED = Counter(
    "plant_audit_rows_replayed_total", "Spooled audit rows replayed", registry=REGISTRY
)
ROWS_DROPPED = Counter(
    "plant_audit_rows_dropped_total", "Audit rows lost (must stay 0)", registry=REGISTRY
)
ROWS_DEAD = Counter(
    "plant_audit_rows_dead_lettered_total", "Audit rows that can never be inserted (quarantined)",
    registry=REGISTRY,
)
WRITE_LATENCY = Histogram(
    "plant_audit_write_latency_seconds",
    "Time to write one batch to PostgreSQL",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
