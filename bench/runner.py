"""One benchmark run: backend up, every scenario measured in turn, then the fixed-rate runs.

A scenario whose tool is missing is ``skipped``; one that breaks is ``failed`` with the reason.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench import profile
from bench.loadgen import LoadResult, Wrk, pacing_connections
from bench.procs import Server, http_status
from bench.scenarios import (
    FIXED_RATE_KEYS,
    RUN_ORDER,
    SCENARIOS,
    Context,
    Scenario,
    Services,
    audit_rows,
    cleanup_real_services,
    gateway_available,
    launch,
    prepare_real_services,
    remove_tree,
    start_backend,
)
from bench.tools import Tools, find_tools
from bench.traffic import EXPECTED_STATUS, Mix, Request, build_requests, expected_denied_share

UNEXPECTED_SHARE_TOLERANCE = 0.02


@dataclass
class Options:
    duration_s: int = 10
    warmup_s: int = 2
    fixed_s: int = 10
    repeats: int = 2
    connections: int = 32
    threads: int = 2
    workers: tuple[int, ...] = (1,)
    mix: Mix = field(default_factory=Mix)
    rate: float | None = None
    rate_share: float = 0.5
    only: tuple[str, ...] = ()
    install: bool = True
    quick: bool = False
    profile_dir: Path | None = None
    services: Services = field(default_factory=Services)
    full_guards: tuple[str, ...] = ("auth", "rate_limit", "policy", "budget", "tenant", "audit")
    # extra environment of every gateway scenario (``--gateway-env``, ``--trace-sample-rate``)
    gateway_env: tuple[tuple[str, str], ...] = ()


@dataclass
class Row:
    scenario: Scenario
    workers: int
    status: str = "ok"
    reason: str = ""
    note: str = ""
    load: LoadResult | None = None
    cpu_s: float = 0.0
    measured_requests: int = 0
    rss_worker_mb: list[float] = field(default_factory=list)
    rss_history_mb: list[float] = field(default_factory=list)
    rps_runs: list[float] = field(default_factory=list)  # req/s of each measured run, in order
    probes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.load is not None

    @property
    def cpu_us_per_req(self) -> float | None:
        return self.cpu_s / self.measured_requests * 1e6 if self.measured_requests else None

    @property
    def req_per_cpu_s(self) -> float | None:
        return self.measured_requests / self.cpu_s if self.cpu_s > 0 else None


@dataclass
class FixedRow:
    scenario: Scenario
    rate: float
    status: str = "ok"
    reason: str = ""
    load: LoadResult | None = None


@dataclass
class RunResult:
    options: Options
    rows: list[Row]
    fixed: list[FixedRow]
    tools: Tools
    backend_note: str
    log: list[str]
    started: float
    finished: float = 0.0
    load_avg: list[float] = field(default_factory=list)  # 1-min load average at start, end
    # nginx (2) req/s when first measured and again after the gateway scenarios (same workers)
    drift: tuple[float, float] | None = None


def run(options: Options, say=print) -> RunResult:  # type: ignore[no-untyped-def]
    log: list[str] = []
    tools = find_tools(install=options.install, log=log)
    for line in log:
        say(f"[bench] {line}")
    for name, why in tools.missing.items():
        say(f"[bench] unavailable: {name}: {why}")
    result = RunResult(options, [], [], tools, "", log, time.time(), load_avg=[_load()])
    workdir = Path(tempfile.mkdtemp(prefix="plant-bench-"))
    run_id = uuid.uuid4().hex[:10]
    try:
        _run_all(options, result, workdir, run_id, say)
    finally:
        cleanup_real_services(options.services, run_id)
        remove_tree(workdir)
    result.finished = time.time()
    result.load_avg.append(_load())
    return result


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _run_all(options: Options, result: RunResult, workdir: Path, run_id: str, say) -> None:  # type: ignore[no-untyped-def]
    wrk_path = result.tools.get("wrk")
    selected = [s for key in RUN_ORDER for s in SCENARIOS
                if s.key == key and (not options.only or key in options.only)]
    if wrk_path is None:
        for workers in options.workers:
            for scenario in selected:
                result.rows.append(Row(scenario, workers, "skipped", "wrk unavailable"))
        return
    backend, base_url, result.backend_note = start_backend(result.tools, workdir)
    gateway_ok, gateway_why = gateway_available()
    wants_real = any(s.key == "5" for s in selected)
    real_why = prepare_real_services(options.services, run_id) if wants_real else None
    requests = build_requests(options.mix)
    wrk = Wrk(wrk_path, workdir, options.threads)
    script = wrk.write_script("mix", requests)
    try:
        for index, workers in enumerate(options.workers):
            ctx = Context(result.tools, workdir, base_url, workers, run_id, options.services,
                          json.dumps(list(options.full_guards)), options.gateway_env)
            for scenario in selected:
                why = _skip_reason(scenario, result.tools, gateway_ok, gateway_why, real_why)
                if why:
                    status = "failed" if scenario.is_gateway and not gateway_ok else "skipped"
                    row = Row(scenario, workers, status, why)
                else:
                    say(f"[bench] scenario {scenario.key} ({scenario.title}), {workers} worker(s)")
                    row = _measure(scenario, ctx, wrk, script, requests, options)
                result.rows.append(row)
                say(f"[bench]   -> {_summary(row)}")
            if index == 0:
                result.drift = _drift_check(selected, ctx, wrk, script, requests, options,
                                            result, say)
                _fixed_rate_pass(selected, ctx, wrk, script, requests, options, result, say)
    finally:
        backend.stop()


def _drift_check(selected: list[Scenario], ctx: Context, wrk: Wrk, script: Path,  # type: ignore[no-untyped-def]
                 requests: list[Request], options: Options, result: RunResult,
                 say) -> tuple[float, float] | None:
    """nginx (2) once more after the gateway scenarios: the ratios compare runs minutes apart,
    and a shared VM's speed drifts (±15 % within an hour seen here); this says by how much."""
    first = next((row for row in result.rows if row.scenario.key == "2"
                  and row.workers == ctx.workers and row.ok and row.load), None)
    if first is None or first.load is None:
        return None
    scenario = next(s for s in selected if s.key == "2")
    say("[bench] drift check: scenario 2 again")
    again = _measure(scenario, ctx, wrk, script, requests, options)
    if not again.ok or again.load is None:
        return None
    return first.load.rps, again.load.rps


def _fixed_rate_pass(selected: list[Scenario], ctx: Context, wrk: Wrk, script: Path,  # type: ignore[no-untyped-def]
                     requests: list[Request], options: Options, result: RunResult, say) -> None:
    """After every peak: one rate for all, so each scenario can hold it and p99s compare."""
    peaks = {row.scenario.key: row for row in result.rows
             if row.workers == ctx.workers and row.ok and row.load}
    rate = options.rate or _common_rate(peaks, options)
    for scenario in selected:
        if scenario.key in FIXED_RATE_KEYS and scenario.key in peaks:
            say(f"[bench] fixed rate {rate:,.0f} req/s: scenario {scenario.key}")
            result.fixed.append(_fixed_rate_run(scenario, ctx, wrk, script, requests, options,
                                                rate))


def _common_rate(peaks: dict[str, Row], options: Options) -> float:
    """``rate_share`` of the slowest gateway scenario's peak (scenario 3's alone would be
    above what the full chains can hold, and their latency would only measure queueing)."""
    gateway = [row.load.rps for row in peaks.values() if row.scenario.is_gateway and row.load]
    return min(gateway) * options.rate_share if gateway else 0.0


def _fixed_rate_run(scenario: Scenario, ctx: Context, wrk: Wrk, script: Path,
                    requests: list[Request], options: Options, rate: float) -> FixedRow:
    server: Server | None = None
    try:
        server, url, _ = launch(scenario, ctx)
        if server is not None:
            ready_path = "/health" if scenario.is_gateway else "/"
            server.wait_ready(url + ready_path, timeout=90 if scenario.is_gateway else 30)
        if options.warmup_s:
            wrk.run(url, script, options.connections, options.warmup_s)
        return _fixed_rate(scenario, wrk, url, requests, options, rate)
    except Exception as exc:  # noqa: BLE001 - a broken run is a row, not a crash
        return FixedRow(scenario, rate, "failed", f"{type(exc).__name__}: {exc}"[:200])
    finally:
        if server is not None:
            server.stop()


def _skip_reason(scenario: Scenario, tools: Tools, gateway_ok: bool, gateway_why: str,
                 real_why: str | None) -> str:
    if scenario.tool and scenario.tool in tools.missing:
        return tools.missing[scenario.tool]
    if scenario.is_gateway and not gateway_ok:
        return gateway_why
    if scenario.key == "5" and real_why:
        return real_why
    return ""


def _summary(row: Row) -> str:
    if not row.ok or row.load is None:
        return f"{row.status}: {row.reason}"
    p99 = row.load.pct_ms.get(99.0, 0.0)
    return f"{row.load.rps:,.0f} req/s, p99 {p99:.2f} ms, non-2xx {row.load.non2xx_share:.1%}"


def _measure(scenario: Scenario, ctx: Context, wrk: Wrk, script: Path, requests: list[Request],
             options: Options) -> Row:
    row = Row(scenario, ctx.workers)
    server: Server | None = None
    try:
        server, url, row.note = launch(scenario, ctx)
        if server is not None:
            ready_path = "/health" if scenario.is_gateway else "/"
            server.wait_ready(url + ready_path, timeout=90 if scenario.is_gateway else 30)
        row.probes = _probe(url, requests, scenario)
        if options.warmup_s:
            wrk.run(url, script, options.connections, options.warmup_s)
        _peak_runs(row, server, wrk, url, script, options)
        _check(row, server, options.mix)
    except Exception as exc:  # noqa: BLE001 - a broken scenario is a row, not a crash
        row.status, row.reason = "failed", f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if server is not None:
            if row.status == "failed" and not server.alive() and "log:" not in row.reason:
                row.reason += f" / log: {server.log_tail()}"[:400]
            server.stop()
        if scenario.kind == "gateway-full-real" and row.ok and "audit" in options.full_guards:
            count = audit_rows(ctx.services, ctx.run_id)
            row.note += f"; {count if count is not None else '?'} audit rows in PostgreSQL"
    return row


def _probe(url: str, requests: list[Request], scenario: Scenario) -> dict[str, int]:
    """One request of each kind; the allowed one must answer 200 (retried while warming up)."""
    first: dict[str, Request] = {}
    for req in requests:
        first.setdefault(req.kind, req)
    allowed = first.get("ok")
    statuses: dict[str, int] = {}
    if allowed is not None:
        deadline = time.monotonic() + 30
        while True:
            statuses["ok"] = http_status(url + allowed.path, allowed.headers)
            if statuses["ok"] == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        if statuses["ok"] != 200:
            raise RuntimeError(f"probe GET {allowed.path} with a valid token answered "
                               f"{statuses['ok']} (expected 200)")
    for kind, req in first.items():
        if kind != "ok" and req.method == "GET":
            statuses[kind] = http_status(url + req.path, req.headers)
    return statuses


def _peak_runs(row: Row, server: Server | None, wrk: Wrk, url: str, script: Path,
               options: Options) -> None:
    repeats = options.repeats if row.scenario.is_gateway else 1
    loads: list[LoadResult] = []
    for index in range(repeats):
        spy = None
        if options.profile_dir and server and server.proc and index == 0:
            (options.profile_dir / "raw").mkdir(parents=True, exist_ok=True)
            raw = options.profile_dir / "raw" / f"profile-{row.scenario.key}-w{row.workers}.txt"
            spy = profile.start(server.proc.pid, options.duration_s, raw)
        before = server.usage().cpu_s if server else 0.0
        load = wrk.run(url, script, options.connections, options.duration_s)
        if spy is not None:
            spy.wait(timeout=60)
            _write_profile(raw, row)
        after = server.usage().cpu_s if server else 0.0
        loads.append(load)
        row.rps_runs.append(load.rps)
        row.cpu_s += after - before
        row.measured_requests += load.requests
        if server is not None:
            row.rss_worker_mb = server.worker_rss_mb(python_workers=row.scenario.is_gateway)
            row.rss_history_mb.append(max(row.rss_worker_mb, default=0.0))
    loads.sort(key=lambda item: item.rps)
    row.load = loads[len(loads) // 2]


def _write_profile(raw: Path, row: Row) -> None:
    if raw.exists():
        summary = profile.summarise(raw)
        title = f"# py-spy: scenario {row.scenario.key} ({row.scenario.title}), {row.workers}w\n\n"
        (raw.parent.parent / raw.with_suffix(".md").name).write_text(title + summary)


def _check(row: Row, server: Server | None, mix: Mix) -> None:
    load = row.load
    if server is not None and not server.alive():
        raise RuntimeError(f"died during the run; log: {server.log_tail()}")
    if load is None or load.requests == 0:
        raise RuntimeError("no request completed")
    if load.socket_errors > 0.01 * load.requests:
        raise RuntimeError(
            f"{load.socket_errors} socket errors/timeouts for {load.requests} requests")
    expected = expected_denied_share(mix, row.scenario.kind)
    if load.non2xx_share > expected + UNEXPECTED_SHARE_TOLERANCE:
        raise RuntimeError(f"non-2xx share {load.non2xx_share:.1%} (mix expects {expected:.1%})")


def _fixed_rate(scenario: Scenario, wrk: Wrk, url: str, requests: list[Request],
                options: Options, rate: float) -> FixedRow:
    if not rate:
        return FixedRow(scenario, 0.0, "skipped", "no gateway peak to derive the rate from")
    connections = pacing_connections(rate)
    script = wrk.write_script(f"paced-{scenario.key}", requests, rate, connections)
    row = FixedRow(scenario, rate)
    try:
        time.sleep(0.5)  # let queued work (audit batches) drain after the peak run
        row.load = wrk.run(url, script, connections, options.fixed_s)
    except Exception as exc:  # noqa: BLE001
        row.status, row.reason = "failed", f"{type(exc).__name__}: {exc}"[:200]
    return row


def expected_statuses() -> dict[str, int]:
    return dict(EXPECTED_STATUS)
