"""Audit writer throughput: rows/s sustained from the recorder through the sink into PostgreSQL.

Usage: .venv/bin/python bench/audit_bench.py [--rows 100000] [--dsn URL] [--batch 2000]
                                             [--sink-from DIR]
(default DSN: DATABASE_URL, else 127.0.0.1:5432, else an embedded server; a scratch database).
``--sink-from DIR`` runs the writer of another version (DIR holding copies of its
plant_gateway/audit/sink.py and schema.py) on the same lines, to compare writers in one session.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plant_gateway.audit.recorder import AuditRecorder  # noqa: E402
from plant_gateway.audit.sink import PostgresAuditSink  # noqa: E402
from plant_gateway.context import Identity, RequestContext  # noqa: E402
from plant_gateway.settings import Settings  # noqa: E402
from tests.fixtures.postgres import (  # noqa: E402
    LOOPBACK_DSN,
    _answers,
    _new_embedded,
    create_database,
    drop_database,
)


def get_ctx(i: int) -> RequestContext:
    """What a proxied GET looks like under wrk: two headers, an identity, no body."""
    c = RequestContext(
        request_id=str(uuid.uuid4()), correlation_id=str(uuid.uuid4()), method="GET",
        path="/fast", query_string="", headers={"host": "127.0.0.1:8080",
                                                  "authorization": "Bearer x.y.z"},
        client_ip="10.0.0.1",
    )
    c.identity = Identity(user_id=str(uuid.uuid4()), email="u@example.com", roles=["user"],
                          customer_id="cust-1")
    c.status_code = 200
    c.response_headers = [("content-type", "application/json"), ("content-length", "2")]
    c.upstream_latency_ms = 0.412
    return c


def ctx(i: int) -> RequestContext:
    c = RequestContext(
        request_id=str(uuid.uuid4()), correlation_id=str(uuid.uuid4()), method="POST",
        path=f"/api/v1/agents/{i}/execute", query_string="limit=10",
        headers={"authorization": "Bearer x.y.z", "content-type": "application/json",
                 "user-agent": "bench"}, client_ip="10.0.0.1",
    )
    c.identity = Identity(user_id=str(uuid.uuid4()), email="u@example.com", roles=["user"],
                          customer_id="cust-1")
    c.request_body_sample = b'{"task": "summarise", "password": "p", "n": 3}'
    c.policy_decision = {"allow": True, "kind": "allow"}
    c.policies_evaluated = ["rbac", "trial"]
    c.status_code = 200
    return c


def load_sink(directory: Path) -> type[PostgresAuditSink]:
    """The sink class of the sink.py in ``directory``, bound to the schema.py beside it
    (its ``from plant_gateway.audit.schema import`` is pointed there while it loads)."""
    schema_name = "plant_gateway.audit.schema"
    current = sys.modules[schema_name]
    try:
        for name in ("schema", "sink"):
            spec = importlib.util.spec_from_file_location(f"{schema_name}_{name}_alt",
                                                          directory / f"{name}.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if name == "schema":
                sys.modules[schema_name] = module
    finally:
        sys.modules[schema_name] = current
    sink: type[PostgresAuditSink] = module.PostgresAuditSink
    return sink


def server_cpu_s(pid: int | None) -> float | None:
    """CPU seconds of a PostgreSQL backend on this host (None when it runs elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(dsn: str, rows: int, batch: int, sink_class: type[PostgresAuditSink]) -> None:
    with tempfile.TemporaryDirectory() as state:
        settings = Settings(plant_backend_url="http://127.0.0.1:9", state_dir=Path(state),
                            audit_batch_size=batch, audit_queue_max=max(rows, 1000),
                            audit_flush_interval_s=0.05, guards=["audit"], database_url=None)
        sink = sink_class(settings, dsn)
        await sink.start()
        recorder = AuditRecorder(settings, sink)
        contexts = [ctx(i) for i in range(rows)]
        captured: list[bytes] = []
        recorder.sink = type("Capture", (), {"submit": staticmethod(captured.append)})()
        gets = [get_ctx(i) for i in range(min(rows, 20_000))]
        t0 = time.process_time()
        for c in gets:
            recorder.record(c)
        t_get = time.process_time() - t0
        captured.clear()
        t0 = time.process_time()
        for c in contexts:
            recorder.record(c)
        t_record = time.process_time() - t0
        # writer alone: the rows are built; submit them as requests would and time the drain
        conn = await sink._conn(sink.writer)  # idle: nothing is queued yet
        backend_pid = await conn.fetchval("SELECT pg_backend_pid()")
        server0 = server_cpu_s(backend_pid)
        wal0 = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        for i, row in enumerate(captured):
            sink.submit(row)
            if i % 1000 == 999:
                await asyncio.sleep(0)
        while not sink.queue.empty():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        server1 = server_cpu_s(backend_pid)
        probe = await sink._connect()  # the writer's connection may be mid-flush
        wal_bytes = await probe.fetchval(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)", wal0)
        await probe.close()
        await sink.close()
        total = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        print(f"rows={rows} batch={batch} written={sink.stats['written']} "
              f"spooled={sink.stats['spooled']} lost={sink.stats['lost']}")
        print(f"record() CPU on the request path: GET {t_get / len(gets) * 1e6:.1f} us/row, "
              f"POST with a JSON body {t_record / rows * 1e6:.1f} us/row (build+redact+hash)")
        print(f"writer CPU in this process: {cpu / rows * 1e6:.1f} us/row "
              "(queue, encoding, COPY, asyncpg; PostgreSQL's CPU not included)")
        if server0 is not None and server1 is not None:
            print(f"PostgreSQL CPU (the writer's server process): "
                  f"{(server1 - server0) / rows * 1e6:.1f} us/row")
        print(f"WAL written by the inserts: {float(wal_bytes) / rows:,.0f} bytes/row "
              "(the table, its twelve indexes and the staging table)")
        print(f"writer: {rows / total:,.0f} rows/s sustained into PostgreSQL "
              f"(COPY batches of {batch})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--sink-from", type=Path, default=None)
    args = parser.parse_args()
    server = None
    admin = args.dsn or (LOOPBACK_DSN if _answers("127.0.0.1", 5432) else None)
    if admin is None:
        server, _ = _new_embedded()
        admin = server.dsn("postgres")
    from plant_gateway import migrations

    dsn = create_database(admin, "pgw_bench")
    try:
        migrations.upgrade(dsn)
        sink_class = PostgresAuditSink if args.sink_from is None else load_sink(args.sink_from)
        asyncio.run(run(dsn, args.rows, args.batch, sink_class))
    finally:
        drop_database(dsn)
        if server is not None:
            server.stop(force=True)


if __name__ == "__main__":
    main()
