"""Unit tests of the benchmark harness's pure parts: wrk summary parsing, traffic mix, pacing.

No server is started here; tests/e2e/test_bench_quick.py runs the harness for real.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import cast

import jwt
import pytest

from bench.configs import envoy_conf, jwks_oct
from bench.loadgen import MARK, lua_script, pacing_connections, parse_wrk
from bench.report import _notes, drift_lines
from bench.runner import Row, RunResult
from bench.scenarios import SCENARIOS
from bench.traffic import DEV_SECRET, Mix, build_requests, parse_mix


def test_parse_wrk_reads_the_done_line() -> None:
    line = MARK + json.dumps({
        "requests": 5000, "duration_us": 2_000_000, "connect": 0, "read": 1, "write": 0,
        "status": 250, "timeout": 2, "mean_us": 812.5, "max_us": 9000,
        "pct": {"50": 700, "90": 1100, "99": 2500, "99.9": 4100},
    })
    result = parse_wrk(f"Running 2s test\n{line}\nRequests/sec: 2500\n")
    assert result.rps == 2500
    assert result.non2xx_share == 0.05
    assert result.socket_errors == 3
    assert result.pct_ms[99.9] == pytest.approx(4.1)


def test_parse_wrk_without_summary_names_the_output() -> None:
    with pytest.raises(ValueError, match="no summary"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_mix_shares_and_distinct_users() -> None:
    mix = parse_mix("bad_token=0.1,policy_deny=0.05,rate_limited=0.05", users=50)
    requests = build_requests(mix, count=1000)
    kinds = [r.kind for r in requests]
    assert kinds.count("bad_token") == 100
    assert kinds.count("policy_deny") == 50
    assert kinds.count("rate_limited") == 50
    tokens = {r.headers["Authorization"] for r in requests if r.kind == "ok"}
    assert len(tokens) == 50


def test_tokens_verify_with_the_dev_secret_only_when_meant_to() -> None:
    requests = build_requests(parse_mix("realistic", users=3), count=200)
    by_kind = {r.kind: r.headers["Authorization"].split()[1] for r in requests}
    claims = jwt.decode(by_kind["ok"], DEV_SECRET, algorithms=["HS256"], issuer="waooaw.com")
    assert claims["roles"] and claims["user_id"] and claims["customer_id"]
    assert jwt.decode(by_kind["rate_limited"], DEV_SECRET, algorithms=["HS256"])["trial_mode"]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(by_kind["bad_token"], DEV_SECRET, algorithms=["HS256"])


@pytest.mark.parametrize("text", ["bogus=0.1", "bad_token=0.7,policy_deny=0.6"])
def test_bad_mix_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_mix(text, users=10)


def test_pacing_leaves_room_for_latency() -> None:
    assert pacing_connections(4000) == 200
    assert pacing_connections(10) == 8


def test_lua_script_paces_only_when_asked() -> None:
    requests = build_requests(Mix(users=2), count=4)
    assert "function delay()" not in lua_script(requests)
    assert "local period_ms = 4.000000" in lua_script(requests, thread_rate=250)


def test_envoy_gets_the_same_hs256_key_as_a_jwks_oct_key() -> None:
    key = json.loads(jwks_oct(DEV_SECRET))["keys"][0]
    assert key["kty"] == "oct" and key["alg"] == "HS256"
    signing = jwt.PyJWK(key).key
    assert signing == DEV_SECRET.encode()
    assert json.dumps(key) in json.loads(envoy_conf(1, 2, 3, DEV_SECRET))["static_resources"][
        "listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0][
        "typed_config"]["providers"]["bench"]["local_jwks"]["inline_string"]


@pytest.mark.parametrize(("again", "warned"), [(95_000.0, False), (85_000.0, True)])
def test_drift_line_warns_past_ten_percent(again: float, warned: bool) -> None:
    result = cast(RunResult, SimpleNamespace(drift=(100_000.0, again)))
    [line] = drift_lines(result)
    assert f"100,000 req/s when first measured, {again:,.0f}" in line
    assert f"({(again - 100_000) / 1000:+.1f} %)" in line
    assert ("speed changed during the run" in line) is warned
    assert drift_lines(cast(RunResult, SimpleNamespace(drift=None))) == []


def test_notes_show_each_runs_rate_and_the_spread() -> None:
    forwarding = next(s for s in SCENARIOS if s.key == "3")
    repeated = Row(forwarding, 1, rps_runs=[12_000.0, 9_600.0])
    single = Row(forwarding, 2, rps_runs=[11_000.0])
    lines = _notes(cast(RunResult, SimpleNamespace(rows=[repeated, single])))
    assert "- (3, 1w) req/s of each run: 12,000 / 9,600 (spread 20%)" in lines
    assert not any("2w" in line for line in lines)  # one run: no spread to show


def test_bench_database_url_keeps_a_socket_dsn() -> None:
    """Without a local server the tests hand the bench an embedded server's socket DSN."""
    from bench.scenarios import Services, _host

    socket_dsn = "postgresql://postgres@/postgres?host=/tmp/pg-sock&port=5433"
    assert Services(postgres_admin_dsn=socket_dsn).database_url("r1") == (
        "postgresql://postgres@/plant_bench_r1?host=/tmp/pg-sock&port=5433"
    )
    tcp = "postgresql://postgres:pw@127.0.0.1:5432/postgres"
    assert Services(postgres_admin_dsn=tcp).database_url("r1") == (
        "postgresql://postgres:pw@127.0.0.1:5432/plant_bench_r1"
    )
    assert _host(socket_dsn) == "/tmp/pg-sock" and _host(tcp) == "127.0.0.1:5432"


def test_gateway_env_pairs_and_the_tracing_shortcut() -> None:
    from bench.__main__ import gateway_env

    assert gateway_env(["LOG_LEVEL=INFO", "A=b=c"], None) == (("LOG_LEVEL", "INFO"), ("A", "b=c"))
    assert gateway_env([], 0.5) == (
        ("TRACE_SAMPLE_RATE", "0.5"), ("OTEL_EXPORTER_OTLP_ENDPOINT", "{backend}"))
    with pytest.raises(ValueError, match="NAME=VALUE"):
        gateway_env(["LOG_LEVEL"], None)
