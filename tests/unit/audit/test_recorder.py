"""The audit recorder's memos (headers, query strings) on the request path.

They must never keep or serve a secret: every row is redacted as if there were no memo.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from plant_gateway.audit.recorder import AuditRecorder, _ms
from plant_gateway.audit.schema import canonical, from_wire, split_line, to_line
from plant_gateway.context import RequestContext
from plant_gateway.settings import Settings

CHAIN = ("id", "seq", "prev_hash", "row_hash")


class Capture:
    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.rows: list[dict[str, Any]] = []

    def submit(self, line: bytes) -> None:
        self.lines.append(line)
        self.rows.append(from_wire(line))


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
    assert all("s3cr3t" not in key for key in rec._query_cache.data)


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
    assert "tok-" not in repr(rec._header_cache.data)
    assert "tok-" not in "".join(str(r) for r in sink.rows)


def test_rows_chain_and_hash_the_canonical_form(tmp_path: Path) -> None:
    rec, sink = recorder(tmp_path)
    for _ in range(3):
        rec.record(ctx("a=1"))
    prev = "0" * 64
    for seq, (row, line) in enumerate(zip(sink.rows, sink.lines, strict=True), start=1):
        assert row["seq"] == seq and row["prev_hash"] == prev
        assert row["row_hash"] == hashlib.sha256(canonical(row)).hexdigest()
        # the queued bytes are the canonical form: what is hashed is what is written
        assert split_line(line) == (canonical(row), row["row_hash"])
        prev = row["row_hash"]


def test_header_memo_keeps_visible_values_apart(tmp_path: Path) -> None:
    """The memo key is the header names plus the visible values: a changed visible value is a
    new entry, a changed hidden value is not (and is never kept)."""
    rec, sink = recorder(tmp_path)
    for agent, token in (("a", "tok-1"), ("b", "tok-2"), ("a", "tok-3")):
        rec.record(ctx(headers={"host": "h", "user-agent": agent, "x-api-key": token},
                       response_headers=[("Server", agent), ("Set-Cookie", token)]))
    seen = [(json.loads(r["request_headers"]), json.loads(r["response_headers"]))
            for r in sink.rows]
    assert [s[0]["user-agent"] for s in seen] == ["a", "b", "a"]
    assert [s[1]["server"] for s in seen] == ["a", "b", "a"]
    assert all(s[0]["x-api-key"] == "***" and s[1]["set-cookie"] == "***" for s in seen)
    assert len(rec._header_cache) == 4
    assert "tok-" not in repr(rec._header_cache.data) + repr(sink.lines)


def test_lines_round_trip_through_the_dict_form(tmp_path: Path) -> None:
    rec, sink = recorder(tmp_path)
    c = ctx("q=1", headers={"host": "h", "x-note": "é\t\"quoted\"\\"})
    c.policy_decision = {"allow": True, "b": [1.5, None]}
    c.policies_evaluated = ["rbac", 'tenant "scope"']
    rec.record(c)
    rec.submit_row(dict(sink.rows[0]))  # a dict row chains and serialises the same way
    first, second = sink.rows
    assert to_line(first) == sink.lines[0]
    assert {k: v for k, v in first.items() if k not in CHAIN} == \
        {k: v for k, v in second.items() if k not in CHAIN}
    assert second["prev_hash"] == first["row_hash"] and second["seq"] == 2


def test_latency_milliseconds_are_rounded_and_never_negative() -> None:
    assert _ms(1.23456) == 1.235 and _ms(0.0004) == 0.0 and _ms(None) is None
    assert _ms(-3.0) == 0.0 and _ms(float("nan")) == 0.0 and _ms(7) == 7.0
