"""Chain marks without a database: finding a row's chain from its line, the spool form, the MAC."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import orjson
import pytest

from plant_gateway.audit.checkpoints import (
    MARK_PREFIX,
    Checkpointer,
    Mark,
    chain_of,
    seq_of,
)
from plant_gateway.audit.recorder import AuditRecorder
from plant_gateway.audit.schema import from_line
from plant_gateway.settings import Settings
from tests.integration.audit.support import context

SECRET = b"k" * 40


class Lines:
    """A sink that keeps the lines (the recorder's ``submit``)."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def submit(self, row: bytes) -> None:
        self.lines.append(row)


def recorder(instance_id: str) -> tuple[AuditRecorder, Lines]:
    sink = Lines()
    cfg = Settings(plant_backend_url="http://127.0.0.1:9", instance_id=instance_id)
    return AuditRecorder(cfg, sink), sink


@pytest.mark.parametrize("instance_id", [
    "gw-1", 'odd,"name"', "back\\slash,", 'ends with a quote"', "ünï,cödé", ",\"", "a" * 200,
])
def test_the_chain_and_seq_are_read_from_the_line_end(instance_id: str) -> None:
    rec, sink = recorder(instance_id)
    for _ in range(3):
        rec.record(context())
    for n, line in enumerate(sink.lines, 1):
        row = from_line(line)
        assert seq_of(line) == row["seq"] == n
        assert orjson.loads(chain_of(line)) == row["instance_id"] == rec.instance_id


def test_marks_keep_each_chains_highest_stored_row_and_come_due() -> None:
    a, a_lines = recorder("a")
    b, b_lines = recorder("b")
    for _ in range(5):
        a.record(context())
        b.record(context())
    marks = Checkpointer(SECRET, interval_s=60, rows=1000, max_unwritten=7)
    assert not marks.due()  # nothing stored yet
    marks.committed(a_lines.lines[3:] + b_lines.lines[:2])  # a replay may store newer first
    marks.committed(a_lines.lines[:3])
    assert marks.due()  # new chains: marked at once
    made = {m.instance_id: m for m in marks.marks(rows_lost=0)}
    assert (made[a.instance_id].seq, made[b.instance_id].seq) == (5, 2)
    assert made[a.instance_id].row_hash == from_line(a_lines.lines[4])["row_hash"]
    assert made[a.instance_id].max_unwritten == 7 and not marks.due()
    marks.committed(b_lines.lines[2:])
    assert not marks.due()  # within the interval
    marks.marked_at = time.monotonic() - 61
    assert marks.due()


def test_a_mark_survives_the_spool_and_its_mac_binds_every_field() -> None:
    at = datetime(2026, 12, 6, 12, 0, 0, 123456, tzinfo=UTC)
    mark = Mark("close", "gw-1/42-abc", 17, "a" * 64, at, at, 300, 30.0, 0).sign(SECRET)
    line = mark.to_line()
    assert line.startswith(MARK_PREFIX) and line.endswith(b"\n") and line.count(b"\n") == 1
    again = Mark.from_line(line.rstrip(b"\n"))
    assert again == mark and again.mac_matches([SECRET])
    assert again.mac_matches([b"old" * 12, SECRET])  # a rotated key still verifies
    assert not again.mac_matches([b"x" * 40])
    for field, value in (("seq", 18), ("row_hash", "b" * 64), ("kind", "checkpoint"),
                         ("instance_id", "gw-2/42-abc")):
        changed = Mark.from_line(line.rstrip(b"\n"))
        setattr(changed, field, value)
        assert not changed.mac_matches([SECRET]), field
    # the key is per chain: the same fields under another chain's name do not verify
    assert Mark("close", "gw-1/42-abd", 17, "a" * 64, at, at, 300, 30.0, 0).sign(SECRET).mac \
        != mark.mac
    assert Mark("close", "x", 1, "a" * 64, at, at).sign(None).mac is None


def test_a_short_chain_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 characters"):
        Settings(plant_backend_url="http://127.0.0.1:9", audit_chain_key="short")
    assert Settings(plant_backend_url="http://127.0.0.1:9", audit_chain_key=" ").audit_chain_key \
        is None


def test_only_own_chains_get_a_heartbeat_an_orphan_is_marked_when_it_moves() -> None:
    own, own_lines = recorder("own")
    orphan, orphan_lines = recorder("orphan")  # an exited process's rows, replayed here
    own.record(context())
    for _ in range(3):
        orphan.record(context())
    marks = Checkpointer(None, interval_s=1, rows=1000, max_unwritten=1)
    marks.register(own.instance_id)
    marks.committed(own_lines.lines + orphan_lines.lines[:2])
    assert {m.instance_id for m in marks.marks(0)} == {own.instance_id, orphan.instance_id}
    marks.marked_at = time.monotonic() - marks.heartbeat_s  # idle since
    assert marks.due()
    assert [m.instance_id for m in marks.marks(0)] == [own.instance_id]  # the orphan: not live
    marks.committed(orphan_lines.lines[2:])
    marks.marked_at = time.monotonic() - 1
    assert {(m.instance_id, m.seq) for m in marks.marks(0)} == {(own.instance_id, 1),
                                                                 (orphan.instance_id, 3)}
