"""Prometheus metrics of the audit writer (process-wide; one set per worker process).

``plant_gateway_audit_rows_lost_total`` stays 0 unless a row could be neither written, queued
nor spooled; with ``AUDIT_ON_LOSS=refuse`` only the rows of requests already under way (and
refusals beyond the spool's headroom) can be lost. The 0/1 gauges say why the sink is degraded.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from plant_gateway.metrics import REGISTRY  # the registry /metrics serves

QUEUE_DEPTH = Gauge(
    "plant_gateway_audit_queue_depth", "Audit rows waiting in memory", registry=REGISTRY
)
SPOOL_PENDING = Gauge(
    "plant_gateway_audit_spool_pending_rows", "Audit rows on disk awaiting replay",
    registry=REGISTRY,
)
ROWS_WRITTEN = Counter(
    "plant_gateway_audit_rows_written_total", "Audit rows written to PostgreSQL", registry=REGISTRY
)
ROWS_SPOOLED = Counter(
    "plant_gateway_audit_rows_spooled_total", "Audit rows written to the disk spool",
    registry=REGISTRY,
)
ROWS_REPLAYED = Counter(
    "plant_gateway_audit_rows_replayed_total", "Spooled audit rows replayed", registry=REGISTRY
)
ROWS_LOST = Counter(
    "plant_gateway_audit_rows_lost_total",
    "Audit rows neither written, queued nor spooled (requests served or refused without a row)",
    registry=REGISTRY,
)
ROWS_DEAD = Counter(
    "plant_gateway_audit_rows_dead_lettered_total",
    "Audit rows that can never be inserted (quarantined)",
    registry=REGISTRY,
)
WRITE_LATENCY = Histogram(
    "plant_gateway_audit_write_duration_seconds",
    "Time to write one batch to PostgreSQL",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
SPOOL_BYTES = Gauge(
    "plant_gateway_audit_spool_bytes", "Size of the disk spool (its cap is AUDIT_SPOOL_MAX_BYTES)",
    registry=REGISTRY,
)
DATABASE_UP = Gauge(
    "plant_gateway_audit_database_up", "1 while the audit database takes rows", registry=REGISTRY
)
SPOOL_WRITABLE = Gauge(
    "plant_gateway_audit_spool_writable", "1 while the disk spool takes rows (0: full or failing)",
    registry=REGISTRY,
)
REFUSING = Gauge(
    "plant_gateway_audit_refusing",
    "1 while requests are refused with 503 audit-unavailable (rows cannot be secured)",
    registry=REGISTRY,
)
TASK_RESTARTS = Counter(
    "plant_gateway_audit_writer_restarts_total",
    "Times the audit writer's tasks (batch writer, spool replay) failed and were restarted",
    registry=REGISTRY,
)
QUEUE_CAPACITY = Gauge(
    "plant_gateway_audit_queue_capacity_rows",
    "Rows the in-memory audit queue holds at most (AUDIT_QUEUE_MAX)", registry=REGISTRY,
)
SPOOL_CAPACITY = Gauge(
    "plant_gateway_audit_spool_capacity_bytes",
    "Size the disk spool may reach (AUDIT_SPOOL_MAX_BYTES)", registry=REGISTRY,
)
