"""BoundedMemo (plant_gateway.memo): never more than its limit, emptied by the insert that finds
it full, the same dict object throughout (callers read ``memo.data`` directly)."""

from __future__ import annotations

from pathlib import Path

from plant_gateway.memo import BoundedMemo


def test_put_returns_the_value_and_data_reads_it_back() -> None:
    memo: BoundedMemo[str, int] = BoundedMemo(4)

    assert memo.put("a", 1) == 1
    assert memo.data.get("a") == 1
    assert memo.data.get("b") is None
    assert len(memo) == 1


def test_the_insert_that_finds_it_full_empties_it_first() -> None:
    memo: BoundedMemo[int, str] = BoundedMemo(3)
    for key in range(3):
        memo.put(key, str(key))
    assert memo.data == {0: "0", 1: "1", 2: "2"}  # full, nothing dropped yet

    memo.put(3, "3")

    assert memo.data == {3: "3"}  # cleared, not least-recently-used eviction


def test_overwriting_a_key_of_a_full_memo_still_empties_it() -> None:
    """The hand-rolled memos checked the size before every insert, a known key included."""
    memo: BoundedMemo[str, int] = BoundedMemo(2)
    memo.put("a", 1)
    memo.put("b", 2)

    memo.put("a", 3)

    assert memo.data == {"a": 3}


def test_never_more_than_the_limit_under_a_flood_of_keys() -> None:
    memo: BoundedMemo[int, int] = BoundedMemo(100)
    sizes = []
    for key in range(1000):
        memo.put(key, key)
        sizes.append(len(memo))

    assert max(sizes) == 100
    assert sizes[100] == 1  # the 101st insert started over


def test_data_stays_the_same_dict_when_emptied() -> None:
    memo: BoundedMemo[int, int] = BoundedMemo(1)
    data = memo.data
    memo.put(1, 1)
    memo.put(2, 2)

    assert memo.data is data and data == {2: 2}


def test_make_room_says_whether_it_emptied_the_memo() -> None:
    memo: BoundedMemo[int, int] = BoundedMemo(2)
    memo.put(1, 1)
    assert memo.make_room() is False and memo.data == {1: 1}
    memo.put(2, 2)

    assert memo.make_room() is True
    assert memo.data == {}


def test_a_zero_limit_keeps_only_the_latest_entry() -> None:
    """A size of 0 behaved like this in the hand-rolled memos (``len >= 0`` always holds)."""
    memo: BoundedMemo[str, int] = BoundedMemo(0)
    memo.put("a", 1)
    memo.put("b", 2)

    assert memo.data == {"b": 2}


# --- the memos built on it keep their limits and key-size conditions ---------------------------


def test_split_path_memoises_only_paths_up_to_256_chars() -> None:
    from plant_gateway.guards import policy

    short, long = "/api/v1/agents/memo-short", "/api/v1/agents/" + "x" * 256
    assert policy.split_path(short) == policy._split_path(short)
    assert policy.split_path(long) == policy._split_path(long)

    assert short in policy._SPLIT_CACHE.data and long not in policy._SPLIT_CACHE.data
    assert policy._SPLIT_CACHE.limit == 4096


def test_upstream_target_memoises_only_keys_up_to_512_chars() -> None:
    from plant_gateway.forwarding.upstream import Upstream
    from plant_gateway.settings import Settings

    settings = Settings(plant_backend_url="http://127.0.0.1:9")
    upstream = Upstream("plant", "http://127.0.0.1:9/base", settings)
    assert upstream.target("/a b", "q=1") == b"/base/a%20b?q=1"
    upstream.target("/p", "q=" + "x" * 512)

    assert upstream._targets.data == {("/a b", "q=1"): b"/base/a%20b?q=1"}
    assert upstream._targets.limit == 1024


def test_fixed_rate_headers_and_gcra_memos_keep_their_limits() -> None:
    from plant_gateway.counters.memory import MemoryCounters
    from plant_gateway.guards import rate_limit
    from plant_gateway.settings import Settings

    counters = MemoryCounters(Settings(plant_backend_url="http://127.0.0.1:9"))
    assert counters._rate_limit("k", 10, 60.0, 2).allowed
    assert list(counters._gcra.data) == [(10, 60.0, 2)] and counters._gcra.limit == 1024
    pair = rate_limit._fixed_rate_headers(10, 60.0)
    assert pair == (("ratelimit-limit", "10"), ("ratelimit-policy", "10;w=60"))
    assert rate_limit._fixed_rate_headers(10, 60.0) is pair  # served from the memo
    assert rate_limit._FIXED_RATE_HEADERS.limit == 1024


def test_audit_recorder_memos_are_bounded_by_header_cache_max(tmp_path: Path) -> None:
    from plant_gateway.audit.recorder import HEADER_CACHE_MAX, AuditRecorder
    from plant_gateway.settings import Settings

    settings = Settings(plant_backend_url="http://127.0.0.1:9", state_dir=tmp_path,
                        guards=["audit"], database_url=None)
    rec = AuditRecorder(settings, None)  # type: ignore[arg-type]  # nothing is submitted
    memos = (rec._header_cache, rec._open_header_cache, rec._query_cache, rec._plans,
             rec._identity_cache)

    assert {memo.limit for memo in memos} == {HEADER_CACHE_MAX}
