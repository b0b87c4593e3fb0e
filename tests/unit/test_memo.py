"""BoundedMemo (plant_gateway.memo): never more than its limit, emptied by the insert that finds
it full, the same dict object throughout (callers read ``memo.data`` directly)."""

from __future__ import annotations

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
