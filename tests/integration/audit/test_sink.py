"""Audit sink and recorder against real PostgreSQL (loopback/DATABASE_URL and embedded).

Counting tests: N rows submitted -> exactly N rows; bad rows quarantined, never re-queued;
secrets never stored in clear; hash chains verified and tampering named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from plant_gateway.audit.schema import GENESIS, row_hash, to_line
from plant_gateway.cli.audit import reader, verify
from tests.integration.audit.support import context, count_ids, fetch, started_sink

N = 2000


async def test_every_submitted_row_is_written_exactly_once(audit_db: str, tmp_path: Path) -> None:
    sink, recorder = await started_sink(audit_db, tmp_path)
    ids = []
    for i in range(N):
        ctx = context(status=(200, 403, 429, 502)[i % 4], user_id=None if i % 3 else
                      "5f0c1f5e-2d7e-4a44-9b7b-0a8c3e3f1e11")
        ids.append(ctx.correlation_id)
        recorder.record(ctx)
    await sink.close()
    assert await count_ids(audit_db, ids) == (N, N)
    assert sink.stats["lost"] == 0 and sink.stats["dead"] == 0


async def test_rows_that_can_never_be_inserted_are_quarantined_not_requeued(
    audit_db: str, tmp_path: Path
) -> None:
    """Deployed-gateway defect: rows with NULL user / non-UUID ids were re-queued forever."""
    sink, recorder = await started_sink(audit_db, tmp_path)
    good = context(status=200)
    recorder.record(good)
    # a non-UUID user id and an anonymous call are insertable rows, not errors
    odd = context(status=200, user_id="auth0|not-a-uuid", email="a@b.c")
    anon = context(status=401)
    recorder.record(odd)
    recorder.record(anon)
    # rows that violate the schema (made by hand, past the recorder) are quarantined
    bad_status = dict(_row(recorder, context()), status_code=700)
    bad_type = dict(_row(recorder, context()), gateway_type="XX")
    bad_uuid = dict(_row(recorder, context()), correlation_id="not-a-uuid")
    for row in (bad_status, bad_type, bad_uuid):
        sink.submit(to_line(row))
    await sink.close()
    assert sink.stats["dead"] == 3
    assert sink.queue.qsize() == 0
    dead = [json.loads(line) for line in sink.dead_path.read_text().splitlines()]
    assert {d["row"]["id"] for d in dead} == {bad_status["id"], bad_type["id"], bad_uuid["id"]}
    rows = await fetch(
        audit_db,
        "SELECT correlation_id::text AS c, user_id, user_ref FROM gateway_audit_logs "
        "WHERE correlation_id = ANY($1::uuid[])",
        [good.correlation_id, odd.correlation_id, anon.correlation_id],
    )
    by_c = {r["c"]: r for r in rows}
    assert len(by_c) == 3
    assert by_c[odd.correlation_id]["user_id"] is None
    assert by_c[odd.correlation_id]["user_ref"] == "auth0|not-a-uuid"
    assert by_c[anon.correlation_id]["user_id"] is None


def _row(recorder, ctx) -> dict:  # noqa: ANN001
    row = recorder.build_row(ctx)
    row.update(instance_id="manual", seq=1, prev_hash="0" * 64, row_hash="0" * 64)
    return row


async def test_secrets_are_never_stored_in_clear(audit_db: str, tmp_path: Path) -> None:
    """Deployed-gateway defect: registration keys, OTP codes, payment data stored in clear."""
    key = "reg-key-7c1d9e0b5a"
    sink, recorder = await started_sink(audit_db, tmp_path, cp_registration_key=key)
    ctx = context(status=201)
    ctx.method = "POST"
    ctx.headers = {"x-cp-registration-key": key, "cookie": "sid=cookie-secret-1",
                   "x-original-authorization": "Bearer eyJhbGciOi.eyJzdWIiOiJ4.sig-secret"}
    ctx.query_string = "token=query-secret-2&page=1"
    ctx.request_body_sample = json.dumps({
        "phone": "+15550100", "otpCode": "918273", "code": "554433",
        "payment": {"card_number": "4111 1111 1111 1111", "cvv": "987", "note": "4111111111111111",
                    "account_number": "DE89370400440532013000"},
        "password": "hunter2-secret", "nested": [{"client_secret": "cs-secret-3"}],
        "comment": f"my key is {key}",
    }).encode()
    recorder.record(ctx)
    await sink.close()
    # every column but the random hex ones (ids, hashes), where "987" or "4111" may occur
    rows = await fetch(audit_db, "SELECT (to_jsonb(t) - 'id' - 'correlation_id' - 'request_id' "
                       "- 'causation_id' - 'instance_id' - 'prev_hash' - 'row_hash')::text AS txt "
                       "FROM gateway_audit_logs t WHERE correlation_id = $1::uuid",
                       ctx.correlation_id)
    assert len(rows) == 1
    text = rows[0]["txt"]
    for secret in (key, "cookie-secret-1", "sig-secret", "query-secret-2", "918273", "554433",
                   "4111", "987", "DE89370400440532013000", "hunter2", "cs-secret-3"):
        assert secret not in text, secret
    assert "+15550100" in text and "page" in text  # the rest is still there


async def test_body_over_the_cap_is_not_stored(audit_db: str, tmp_path: Path) -> None:
    sink, recorder = await started_sink(audit_db, tmp_path, audit_body_cap_bytes=64)
    ctx = context(status=200)
    ctx.request_body_sample = json.dumps({"blob": "x" * 500}).encode()
    recorder.record(ctx)
    await sink.close()
    rows = await fetch(audit_db, "SELECT request_body FROM gateway_audit_logs "
                       "WHERE correlation_id = $1::uuid", ctx.correlation_id)
    body = json.loads(rows[0]["request_body"])
    assert body["_omitted"] == "too_large" and "blob" not in body


async def test_verify_names_edited_deleted_and_forged_rows(audit_db: str, tmp_path: Path) -> None:
    sink, recorder = await started_sink(audit_db, tmp_path)
    for _ in range(10):
        recorder.record(context(status=200))
    await sink.close()
    inst = recorder.instance_id
    conn = await reader(audit_db, admin=True)
    try:
        checked, findings = await verify(conn)
        assert checked >= 10
        assert [f for f in findings if f.instance_id == inst] == []
    finally:
        await conn.close()
    admin = await asyncpg.connect(audit_db)
    try:
        rows = await admin.fetch("SELECT id::text, seq FROM gateway_audit_logs "
                                 "WHERE instance_id = $1 ORDER BY seq", inst)
        edited, deleted = rows[3], rows[6]
        await admin.execute("UPDATE gateway_audit_logs SET status_code = 500 WHERE id = $1::uuid",
                            edited["id"])
        await admin.execute("DELETE FROM gateway_audit_logs WHERE id = $1::uuid", deleted["id"])
        forged_id = "0b5f9a4e-1111-4c2d-8e3f-222233334444"
        await admin.execute(
            "INSERT INTO gateway_audit_logs (id, correlation_id, \"timestamp\", gateway_type, "
            "status_code, total_latency_ms, instance_id, seq, prev_hash, row_hash) "
            "VALUES ($1::uuid, gen_random_uuid(), now(), 'PLANT', 200, 1, $2, 11, $3, $3)",
            forged_id, inst, "f" * 64,
        )
    finally:
        await admin.close()
    conn = await reader(audit_db, admin=True)
    try:
        _, findings = await verify(conn)
    finally:
        await conn.close()
    mine = [f for f in findings if f.instance_id == inst]
    kinds = {(f.kind, f.row_id, f.seq) for f in mine}
    assert ("edited", edited["id"], edited["seq"]) in kinds
    assert ("deleted", None, deleted["seq"]) in kinds
    assert ("forged", forged_id, 11) in kinds
    assert len(mine) == 3, mine


async def test_jsonb_values_that_postgres_reformats_still_verify(
    audit_db: str, tmp_path: Path
) -> None:
    """The hash covers the jsonb text once; floats, huge ints, NUL and odd keys round-trip."""
    sink, recorder = await started_sink(audit_db, tmp_path)
    tricky: list[dict[str, Any]] = [
        {"f": 1e16, "g": 1e-10, "h": 0.30000000000000004, "z": -0.0, "n": float("nan")},
        {"big": 10**30, "u64": 2**63 + 5, "neg": -(10**20), "e": 2.5e-7, "i": 5.0},
        {"nul": "a\x00b", "sur": "x\ud800y", "esc": "tab\tq\"\\", "uni": "é✓"},
        {"nested": [{"b": 1, "a": [1.5, {"k": "5f0c1f5e-2d7e"}]}], "empty": {}, "l": []},
    ]
    for value in tricky:
        ctx = context(status=200)
        ctx.policy_decision = value
        ctx.request_body_sample = b'{"amount": 1e400, "id": 123456789012345678901234567890}'
        recorder.record(ctx)
    await sink.close()
    assert sink.stats["written"] == len(tricky) and sink.stats["dead"] == 0
    conn = await reader(audit_db, admin=True)
    try:
        checked, findings = await verify(conn)
    finally:
        await conn.close()
    assert checked >= len(tricky)
    assert [f for f in findings if f.instance_id == recorder.instance_id] == []


async def test_a_batch_repeating_stored_rows_is_written_without_duplicates(
    audit_db: str, tmp_path: Path
) -> None:
    """A spool replay after a lost commit acknowledgement resends stored rows: the plain INSERT
    fails on the duplicate and the batch is retried with ON CONFLICT DO NOTHING, not dropped."""
    sink, recorder = await started_sink(audit_db, tmp_path)
    first = [context(status=200) for _ in range(5)]
    for ctx in first:
        recorder.record(ctx)
    stored = list(sink.queue.rows)
    await sink.close()
    sink, recorder = await started_sink(audit_db, tmp_path)
    fresh = context(status=201)
    recorder.record(fresh)
    for line in stored:  # the same rows again, in one batch with a new one
        sink.submit(line)
    await sink.close()
    ids = [c.correlation_id for c in first] + [fresh.correlation_id]
    assert await count_ids(audit_db, ids) == (6, 6)
    assert sink.stats["dead"] == 0 and sink.stats["lost"] == 0


async def test_roles_needing_quotes_are_stored_exactly_and_verify(
    audit_db: str, tmp_path: Path
) -> None:
    """text[] values travel as array literals: quotes, backslashes, commas, braces, blanks."""
    sink, recorder = await started_sink(audit_db, tmp_path)
    roles = ['a"b', "c\\d", "x,y", "{z}", " pad ", "NULL", "", "é"]
    ctx = context(status=200, user_id="5f0c1f5e-2d7e-4a44-9b7b-0a8c3e3f1e11", roles=roles)
    ctx.policies_evaluated = ["rbac", 'tenant "scope"']
    recorder.record(ctx)
    await sink.close()
    rows = await fetch(audit_db, "SELECT roles, opa_policies_evaluated FROM gateway_audit_logs "
                                 "WHERE correlation_id = $1::uuid", ctx.correlation_id)
    assert [list(r) for r in rows] == [[roles, ["rbac", 'tenant "scope"']]]
    conn = await reader(audit_db, admin=True)
    try:
        _, findings = await verify(conn)
    finally:
        await conn.close()
    assert [f for f in findings if f.instance_id == recorder.instance_id] == []


async def test_an_older_spool_of_json_objects_is_replayed_and_verifies(
    audit_db: str, tmp_path: Path
) -> None:
    """Spools written before rows travelled as lines hold one JSON object per row: a restarted
    gateway still replays them, in order, with their hash chain intact."""
    sink, recorder = await started_sink(audit_db, tmp_path)
    contexts = [context(status=200) for _ in range(3)]
    prev, lines = GENESIS, []
    for seq, ctx in enumerate(contexts, start=1):
        row = dict(recorder.build_row(ctx), instance_id="old-spool", seq=seq, prev_hash=prev)
        row["row_hash"] = prev = row_hash(row)
        lines.append(orjson.dumps(row) + b"\n")  # the former spool format
    (sink.spool_dir / "old-1.jsonl").write_bytes(b"".join(lines))
    await sink._replay_orphans()
    await sink.close()
    assert await count_ids(audit_db, [c.correlation_id for c in contexts]) == (3, 3)
    assert sink.stats["replayed"] == 3 and sink.stats["dead"] == 0
    conn = await reader(audit_db, admin=True)
    try:
        _, findings = await verify(conn)
    finally:
        await conn.close()
    assert [f for f in findings if f.instance_id == "old-spool"] == []
