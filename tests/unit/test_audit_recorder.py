"""The audit recorder's memos (headers, query strings) on the request path.

They must never keep or serve a secret: every row is redacted as if there were no memo.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from plant_gateway.backends.audit_schema import canonical
from plant_gateway.context import RequestContext
from plant_gateway.settings import Settings
from plant_gateway.steps.audit import AuditRecorder


class Capture:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def submit(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


def recorder(tmp_path: Path) -> tuple[AuditRecorder, Capture]:
    settings = Settings(plant_backend_url="http://127.0.0.1:9", state_dir=tmp_path,
                        guards=["audit"], database_url=None)
    sink = Capture()
    return AuditRecorder(settings, sink), sink


def ctx(query: str = "", headers: dict[str, str] | None = None,
        response_headers: list[tuple[str, str]] | None = None) -> RequestContext:
    c = RequestContext(request_id=str(uuid.uuid4()), correlation_id=str(uuid.uuid4()),
                       method="GET", path="/x", query_string=query,
                       headers=headers or {"host": "h"}, client_ip="127.0.0.1")
    c.status_code = 200
    c.response_headers = response_headers or []
    return c


def test_secret_query_is_masked_every_time_and_never_memoised(tmp_path: Path) -> None:
    rec, sink = recorder(tmp_path)
    for _ in range(3):
        rec.record(ctx("token=s3cr3t-value&limit=5"))
        rec.record(ctx("limit=5"))
    secret_rows = [json.loads(r["query_params"]) for r in sink.rows[::2]]
    assert secret_rows == [{"limit": "5", "token": "***"}] * 3
    assert [json.loads(r["query_params"]) for r in sink.rows[1::2]] == [{"limit": "5"}] * 3
    assert all("s3cr3t" not in key for key in rec._query_cache)


def test_header_memo_masks_hidden_headers_and_keeps_no_token(tmp_path: Path) -> None:
    rec, sink = recorder(tmp_path)
    for token in ("tok-one", "tok-two"):
        rec.record(ctx(headers={"host": "h", "authorization": f"Bearer {token}"},
                       response_headers=[("Set-Cookie", f"sid={token}"), ("Server", "s")]))
    # a header name first seen after the memo is warm is still classified
    rec.record(ctx(headers={"host": "h", "X-Session-Id": "tok-three"}))
    seen = [(json.loads(r["request_headers"]), r["response_headers"]) for r in sink.rows]
    assert seen[0][0] == seen[1][0] == {"host": "h", "authorization": "***"}
    assert json.loads(seen[0][1]) == {"server": "s", "set-cookie": "***"}
    assert seen[2][0] == {"host": "h", "x-session-id": "***"}
    assert "tok-" not in repr(rec._header_cache)
    assert "tok-" not in "".join(str(r) for r in sink.rows)


def test_rows_chain_and_hash_the_canonical_form(tmp_path: Path) -> None:
    rec, sink = recorder(tmp_path)
    for _ in range(3):
        rec.record(ctx("a=1"))
    prev = "0" * 64
    for seq, row in enumerate(sink.rows, start=1):
        assert row["seq"] == seq and row["prev_hash"] == prev
        assert row["row_hash"] == hashlib.sha256(canonical(row)).hexdigest()
        prev = row["row_hash"]
