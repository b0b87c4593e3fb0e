"""Process limits: the gateway raises its own open-file limit to what its settings need."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import resource, sys
    from plant_gateway.runtime import open_files_needed, raise_open_files_limit
    soft, hard = int(sys.argv[1]), int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    needed = open_files_needed(max_connections=1000, upstream_pool_size=256, upstreams=1)
    now, _ = raise_open_files_limit(needed)
    print(needed, now, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
""")


def run(soft: int, hard: int) -> list[int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(soft), str(hard)], check=True,
                         capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_a_soft_limit_below_the_need_is_raised_to_it() -> None:
    needed, now, actual = run(1024, 4096)
    assert needed == 1000 + 256 + 256
    assert now == actual == needed


def test_a_hard_limit_below_the_need_is_reported_not_exceeded() -> None:
    needed, now, actual = run(256, 512)
    assert now == actual == 512 < needed  # serve warns with these two numbers


def test_a_soft_limit_already_large_enough_is_left_alone() -> None:
    _, now, actual = run(4000, 4096)
    assert now == actual == 4000
