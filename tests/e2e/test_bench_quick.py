"""End-to-end: ``python -m bench --quick`` runs every scenario once and writes its table.

Asserts the harness works (a row per scenario, gateway rows measured), never the timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.scenarios import SCENARIOS

REPO = Path(__file__).resolve().parents[2]
GATEWAY_KEYS = {s.key for s in SCENARIOS if s.is_gateway}


def test_quick_bench_writes_a_row_per_scenario(
    tmp_path: Path, redis_url: str, postgres_dsn: str
) -> None:
    out = tmp_path / "quick.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--no-readme",
         "--redis-url", redis_url, "--postgres-admin-url", postgres_dsn,
         "--mix", "bad_token=0.05,policy_deny=0.05", "--users", "20"],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert out.exists(), f"no table written:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    table = out.read_text()
    data = json.loads(out.with_suffix(".json").read_text())
    rows = {row["key"]: row for row in data["rows"]}

    assert set(rows) == {s.key for s in SCENARIOS}
    for scenario in SCENARIOS:
        assert f"| {scenario.key} | {scenario.title} |" in table
        row = rows[scenario.key]
        assert row["status"] in ("ok", "skipped"), f"{scenario.key}: {row['reason']}"
        if row["status"] == "skipped":
            assert row["reason"] and f"skipped ({row['reason']}" in table
    for key in GATEWAY_KEYS:
        assert rows[key]["status"] == "ok", f"gateway scenario {key}: {rows[key]['reason']}"
        assert rows[key]["load"]["requests"] > 0
    # The full chain answered the denied share of the mix itself (401/403), forwarding did not.
    assert rows["4"]["load"]["non2xx_share"] > 0.0
    assert rows["3"]["load"]["non2xx_share"] == 0.0
    assert "## Latency at a fixed rate" in table and "## Targets (issue 7)" in table
    if rows["2"]["status"] == "ok":  # nginx measured twice: the drift line says how far apart
        first, again = data["drift"]
        assert first > 0 and again > 0
        assert f"nginx (2) {first:,.0f} req/s when first measured, {again:,.0f}" in table
    assert done.returncode == 0, done.stderr[-2000:]
