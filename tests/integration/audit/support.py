"""Helpers shared by the audit integration tests: settings, contexts, row counting."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from plant_gateway.audit.recorder import AuditRecorder
from plant_gateway.audit.sink import PostgresAuditSink
from plant_gateway.context import Identity, RequestContext
from plant_gateway.settings import Settings


def settings(state_dir: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "plant_backend_url": "http://127.0.0.1:9",
        "state_dir": state_dir,
        "instance_id": f"test-{uuid.uuid4().hex[:8]}",
        "audit_flush_interval_s": 0.05,
        "audit_batch_size": 200,
        "guards": ["audit"],
        "database_url": None,
    }
    values.update(extra)
    return Settings(**values)


def context(status: int = 200, **identity: Any) -> RequestContext:
    ctx = RequestContext(
        request_id=str(uuid.uuid4()),
        correlation_id=str(uuid.uuid4()),
        method="GET",
        path="/api/v1/agents/42",
        query_string="limit=5",
        headers={"authorization": "Bearer abc.def.ghi", "user-agent": "pytest"},
        client_ip="127.0.0.1",
    )
    ctx.status_code = status
    if identity:
        ident = Identity(**identity)
        ident.roles = ident.roles or ["user"]
        ctx.identity = ident
    return ctx


async def started_sink(dsn: str, state_dir: Path, **extra: Any) -> tuple[PostgresAuditSink,
                                                                         AuditRecorder]:
    cfg = settings(state_dir, **extra)
    sink = PostgresAuditSink(cfg, dsn)
    await sink.start()
    return sink, AuditRecorder(cfg, sink)


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def count_ids(dsn: str, correlation_ids: list[str]) -> tuple[int, int]:
    """(rows, distinct ids) among rows with these correlation ids."""
    rows = await fetch(
        dsn,
        "SELECT count(*) AS n, count(DISTINCT id) AS d FROM gateway_audit_logs "
        "WHERE correlation_id = ANY($1::uuid[])",
        correlation_ids,
    )
    return rows[0]["n"], rows[0]["d"]


async def until(condition: Callable[[], bool], within_s: float = 30.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``within_s`` passed (False)."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def record(recorder: AuditRecorder, ids: list[str], count: int) -> None:
    """``count`` answered requests recorded; their correlation ids appended to ``ids``."""
    for _ in range(count):
        ctx = context(status=200)
        ids.append(ctx.correlation_id)
        recorder.record(ctx)
