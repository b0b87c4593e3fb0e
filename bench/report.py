"""Turning a run into Markdown: the results table, the fixed-rate table, the targets footer.

Also writes the machine description and refreshes the README's Benchmark section (full runs).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.runner import FixedRow, Row, RunResult

RSS_LIMIT_MB = 150.0
RSS_GROWTH_TOLERANCE_MB = 5.0
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


DRIFT_WARN_PCT = 10.0  # nginx re-measured this much off: say so next to the ratios


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "os": _os_name(),
    }


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def tool_versions(result: RunResult) -> dict[str, str]:
    flags = {"wrk": ["-v"], "nginx": ["-v"], "envoy": ["--version"], "traefik": ["version"]}
    out: dict[str, str] = {}
    for name, path in result.tools.paths.items():
        try:
            done = subprocess.run([path, *flags[name]], capture_output=True, text=True,  # noqa: S603
                                  timeout=30, check=False)
            text = (done.stdout + done.stderr).strip().splitlines()
            out[name] = _short_version(name, text)
        except (OSError, subprocess.TimeoutExpired):
            out[name] = "?"
    return out


def _short_version(name: str, lines: list[str]) -> str:
    for line in lines:
        low = line.lower()
        if name == "envoy" and "version:" in low:
            parts = line.split("version:", 1)[1].strip().split("/")
            return parts[1] if len(parts) > 1 else parts[0]
        if name == "traefik" and low.startswith("version:"):
            return line.split(":", 1)[1].strip()
        if name in ("wrk", "nginx") and name in low:
            return line.split()[1] if name == "wrk" else line.split("/")[-1]
    return lines[0][:40] if lines else "?"


# --- formatting helpers ------------------------------------------------------------------------

def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if value is None else fmt.format(value)


def _ratio(row: Row, base: Row | None) -> str:
    if not row.ok or base is None or not base.ok or row.load is None or base.load is None:
        return "–"
    return f"{row.load.rps / base.load.rps:.2f}" if base.load.rps else "–"


def _find(rows: list[Row], key: str, workers: int) -> Row | None:
    return next((r for r in rows if r.scenario.key == key and r.workers == workers), None)


def _status(row: Row | FixedRow) -> str:
    if row.status == "ok":
        return "ok"
    return f"{row.status} ({row.reason.replace('|', '/')})"


def results_table(result: RunResult) -> list[str]:
    lines = [
        "| # | Scenario | Workers | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | non-2xx "
        "| CPU µs/req | req per CPU-s | RSS/worker MB | ×(2) | ×(3) | ×(6) | Status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in sorted(result.rows, key=lambda r: (r.workers, r.scenario.key)):
        lines.append(_row_line(row, result.rows))
    return lines


def _row_line(row: Row, rows: list[Row]) -> str:
    load = row.load if row.ok else None
    pct = load.pct_ms if load else {}
    rss = max(row.rss_worker_mb, default=None) if row.scenario.kind not in ("backend",) else None
    cells = [
        row.scenario.key, row.scenario.title, str(row.workers),
        _num(load.rps if load else None),
        *(_num(pct.get(p), "{:.2f}") for p in (50.0, 90.0, 99.0, 99.9)),
        _num(load.non2xx_share * 100 if load else None, "{:.1f}%"),
        _num(row.cpu_us_per_req if row.ok and row.scenario.kind != "backend" else None, "{:.0f}"),
        _num(row.req_per_cpu_s if row.ok and row.scenario.kind != "backend" else None),
        _num(rss if row.ok else None, "{:.0f}"),
        _ratio(row, _find(rows, "2", row.workers)),
        _ratio(row, _find(rows, "3", row.workers)),
        _ratio(row, _find(rows, "6", row.workers)),
        _status(row),
    ]
    return "| " + " | ".join(cells) + " |"


def _notes(result: RunResult) -> list[str]:
    lines = []
    for row in sorted(result.rows, key=lambda r: (r.workers, r.scenario.key)):
        probes = ", ".join(f"{kind} → {status}" for kind, status in row.probes.items())
        details = "; ".join(part for part in (row.note.strip("; "), probes and f"probes: {probes}",
                                              _run_spread(row), _rss_history(row)) if part)
        if details:
            lines.append(f"- ({row.scenario.key}, {row.workers}w) {details}")
    return [*lines, ""] if lines else []


def _run_spread(row: Row) -> str:
    """Each run's req/s: on a shared 2-core VM the spread between runs of one server is often
    wider than the distance to a target, so the reader sees it next to the median."""
    if len(row.rps_runs) < 2:
        return ""
    low, high = min(row.rps_runs), max(row.rps_runs)
    runs = " / ".join(f"{rps:,.0f}" for rps in row.rps_runs)
    return f"req/s of each run: {runs} (spread {(high - low) / high:.0%})"


def _rss_history(row: Row) -> str:
    if len(row.rss_history_mb) < 2:
        return ""
    steps = " → ".join(f"{mb:.0f}" for mb in row.rss_history_mb)
    return f"worker RSS after each run: {steps} MB"


def fixed_table(result: RunResult) -> list[str]:
    if not result.fixed:
        return ["_No fixed-rate run (no gateway scenario had a peak)._"]
    lines = [
        "| # | Scenario | target req/s | achieved req/s | p50 ms | p99 ms | p99.9 ms "
        "| non-2xx | Status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in sorted(result.fixed, key=lambda r: r.scenario.key):
        load = row.load if row.status == "ok" else None
        pct = load.pct_ms if load else {}
        lines.append("| " + " | ".join([
            row.scenario.key, row.scenario.title, _num(row.rate),
            _num(load.rps if load else None),
            *(_num(pct.get(p), "{:.2f}") for p in (50.0, 99.0, 99.9)),
            _num(load.non2xx_share * 100 if load else None, "{:.1f}%"),
            _fixed_status(row),
        ]) + " |")
    return lines


def _saturated(row: FixedRow) -> bool:
    return row.status == "ok" and row.load is not None and row.load.rps < 0.95 * row.rate


def _fixed_status(row: FixedRow) -> str:
    if _saturated(row):
        return "saturated (cannot sustain the rate: latency is queueing)"
    return _status(row)


# --- targets -----------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: could not be computed


def targets(result: RunResult) -> list[Target]:
    workers = result.options.workers[0]
    rows = {r.scenario.key: r for r in result.rows if r.workers == workers}
    return [_t_real_vs_forward(rows), _t_forward_vs_nginx(rows), _t_full_vs_envoy(rows),
            *_t_added_p99(result), _t_rss(result)]


def _rps(rows: dict[str, Row], key: str) -> float | None:
    row = rows.get(key)
    return row.load.rps if row and row.ok and row.load else None


def _share_target(name: str, goal: float, top: float | None, bottom: float | None) -> Target:
    if top is None or not bottom:
        return Target(name, f"≥ {goal:.0%}", "n/a (a scenario did not run)", None)
    share = top / bottom
    return Target(name, f"≥ {goal:.0%}", f"{share:.0%} ({top:,.0f} / {bottom:,.0f} req/s)",
                  share >= goal)


def _t_real_vs_forward(rows: dict[str, Row]) -> Target:
    return _share_target("(5) full chain, Redis + PostgreSQL vs (3) pure forwarding", 0.60,
                         _rps(rows, "5"), _rps(rows, "3"))


def _t_forward_vs_nginx(rows: dict[str, Row]) -> Target:
    return _share_target("(3) pure forwarding vs (2) nginx, same workers", 0.30,
                         _rps(rows, "3"), _rps(rows, "2"))


def _t_full_vs_envoy(rows: dict[str, Row]) -> Target:
    name = "(4) full chain, embedded vs (6) Envoy JWT + rate limit, per core (req per CPU-s)"
    full, envoy = rows.get("4"), rows.get("6")
    a = full.req_per_cpu_s if full and full.ok else None
    b = envoy.req_per_cpu_s if envoy and envoy.ok else None
    if a is None or not b:
        return Target(name, "≥ 50% (within 2×)", "n/a (a scenario did not run)", None)
    return Target(name, "≥ 50% (within 2×)",
                  f"{a / b:.0%} ({a:,.0f} / {b:,.0f} req per CPU-s)", a / b >= 0.5)


def _t_added_p99(result: RunResult) -> list[Target]:
    fixed = {r.scenario.key: r for r in result.fixed if r.status == "ok" and r.load}
    base = fixed.get("3")
    out: list[Target] = []
    for key in ("4", "5"):
        name = f"p99 added by full chain ({key}) over forwarding (3) at fixed rate"
        row = fixed.get(key)
        if base is None or base.load is None or row is None or row.load is None:
            out.append(Target(name, "≤ 2 ms", "n/a (a fixed-rate run did not happen)", None))
            continue
        added = row.load.pct_ms[99.0] - base.load.pct_ms[99.0]
        measured = f"{added:+.2f} ms at {base.rate:,.0f} req/s"
        if _saturated(base) or _saturated(row):
            out.append(Target(name, "≤ 2 ms", measured + " (not comparable: a run could not "
                              "hold the rate)", None if _saturated(base) else False))
            continue
        out.append(Target(name, "≤ 2 ms", measured, added <= 2.0))
    return out


def _t_rss(result: RunResult) -> Target:
    name = "gateway RSS per worker after the run; growth across repeated runs"
    gw = [r for r in result.rows if r.scenario.is_gateway and r.ok and r.rss_worker_mb]
    if not gw:
        return Target(name, f"≤ {RSS_LIMIT_MB:.0f} MB, no growth", "n/a (no gateway run)", None)
    peak = max(max(r.rss_worker_mb) for r in gw)
    growths = [r.rss_history_mb[-1] - r.rss_history_mb[0] for r in gw if len(r.rss_history_mb) > 1]
    growth = max(growths) if growths else None
    measured = f"max {peak:.0f} MB; growth " + (
        f"{growth:+.1f} MB over {len(gw[0].rss_history_mb)} runs" if growth is not None
        else "n/a (one run per scenario)")
    met = peak <= RSS_LIMIT_MB and (growth is None or growth <= RSS_GROWTH_TOLERANCE_MB)
    goal = f"≤ {RSS_LIMIT_MB:.0f} MB, growth ≤ {RSS_GROWTH_TOLERANCE_MB:.0f} MB"
    return Target(name, goal, measured, met)


def targets_table(result: RunResult) -> list[str]:
    lines = ["| Target | Goal | Measured | Met |", "|---|---|---|---|"]
    for t in targets(result):
        met = "n/a" if t.met is None else ("yes" if t.met else "**no**")
        lines.append(f"| {t.name} | {t.goal} | {t.measured} | {met} |")
    return lines


# --- documents ---------------------------------------------------------------------------------

def markdown(result: RunResult) -> str:
    opts = result.options
    info = machine_info()
    versions = tool_versions(result)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(result.started))
    mode = "quick" if opts.quick else "full"
    lines = [
        f"# Plant Gateway benchmark ({mode} run, {when})",
        "",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['kernel']}, {info['os']}, "
        f"Python {info['python']}",
        "- Tools: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
        f"- Load: wrk, {opts.threads} threads, {opts.connections} connections, "
        f"{opts.duration_s} s per run after {opts.warmup_s} s warm-up; gateway scenarios "
        f"repeated {opts.repeats}× in one process (median run shown)",
        f"- Traffic: {opts.mix.describe()}; small JSON GET/POST with an HS256 bearer token",
        f"- Backend: {result.backend_note}",
        f"- Full chain (4, 5): guards {', '.join(opts.full_guards)}; HS256 dev secret; "
        "limits and budgets set high enough never to reject allowed traffic",
        *(["- Gateway environment added: "
           + ", ".join(f"`{k}={v}`" for k, v in opts.gateway_env)] if opts.gateway_env else []),
        f"- Duration of the whole run: {result.finished - result.started:.0f} s; 1-min load "
        f"average at start / end: {' / '.join(f'{x:.2f}' for x in result.load_avg)} "
        "(anything else running on the machine competes with the servers and wrk)"
        + (" — **the machine was busy: treat these numbers as noisy**"
           if max(result.load_avg, default=0.0) > (os.cpu_count() or 1) else ""),
        *drift_lines(result),
        "",
        "## Peak throughput at fixed concurrency",
        "",
        *results_table(result),
        "",
        "CPU is summed over the server's processes (scenario 4 includes its embedded PostgreSQL; "
        "scenario 5 excludes the shared Redis and PostgreSQL servers); RSS/worker is the largest "
        "serving process (gateway: Python workers only). "
        "×(n) is throughput relative to scenario n with the same workers.",
        "",
        *_notes(result),
        "## Latency at a fixed rate",
        "",
        *fixed_table(result),
        "",
        "## Targets (issue 7)",
        "",
        *targets_table(result),
        "",
    ]
    for line in result.log:
        lines.append(f"- install: {line}")
    return "\n".join(lines).rstrip() + "\n"


def drift_lines(result: RunResult) -> list[str]:
    """How much the machine's speed moved during the run (nginx measured twice)."""
    if result.drift is None:
        return []
    first, again = result.drift
    change = (again - first) / first * 100 if first else 0.0
    line = (f"- Machine drift: nginx (2) {first:,.0f} req/s when first measured, {again:,.0f} "
            f"after the gateway scenarios ({change:+.1f} %); the ratios carry about that "
            "uncertainty")
    if abs(change) > DRIFT_WARN_PCT:
        line += " — **the machine's speed changed during the run**"
    return [line]


def write_outputs(result: RunResult, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(result))
    out.with_suffix(".json").write_text(json.dumps(as_json(result), indent=1))
    return out


def as_json(result: RunResult) -> dict[str, object]:
    def load(row: Row | FixedRow) -> dict[str, object] | None:
        if row.load is None:
            return None
        return {"rps": row.load.rps, "requests": row.load.requests,
                "non2xx_share": row.load.non2xx_share,
                "pct_ms": {str(k): v for k, v in row.load.pct_ms.items()}}

    return {
        "machine": machine_info(),
        "rows": [{"key": r.scenario.key, "title": r.scenario.title, "workers": r.workers,
                  "status": r.status, "reason": r.reason, "load": load(r),
                  "cpu_us_per_req": r.cpu_us_per_req, "rss_worker_mb": r.rss_worker_mb,
                  "rss_history_mb": r.rss_history_mb,
                  "rps_runs": r.rps_runs, "probes": r.probes}
                 for r in result.rows],
        "fixed": [{"key": r.scenario.key, "rate": r.rate, "status": r.status,
                   "reason": r.reason, "load": load(r)} for r in result.fixed],
        "targets": [t.__dict__ for t in targets(result)],
        "drift": list(result.drift) if result.drift else None,
    }


def update_readme(result: RunResult, readme: Path, results_path: str) -> bool:
    """Replace the README's generated Benchmark block (add the section at the end if absent).

    A missing README is left missing (its author creates it); returns whether it was written.
    """
    if not readme.exists():
        return False
    block = readme_block(result, results_path)
    text = readme.read_text()
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        tail = rest.split(README_END, 1)[1]
        readme.write_text(head + block + tail)
        return True
    section = "\n## Benchmark\n\n" + block + "\n"
    readme.write_text(text.rstrip("\n") + "\n" + section)
    return True


def readme_block(result: RunResult, results_path: str) -> str:
    info = machine_info()
    workers = result.options.workers[0]
    rows = [r for r in result.rows if r.workers == workers]
    lines = [
        README_START,
        f"Measured by `python -m bench` on {info['cpu']} ({info['cores']} cores, "
        f"{info['kernel']}, Python {info['python']}), {workers} worker(s) per proxy, "
        f"{result.options.connections} connections, traffic: {result.options.mix.describe()}; "
        f"full chain (4, 5) = guards {', '.join(result.options.full_guards)}. "
        f"Full table: [{results_path}]({results_path}).",
        *[line.removeprefix("- ") for line in drift_lines(result)],
        "",
        "| # | Scenario | req/s | p99 ms | ×(2) nginx | ×(3) forwarding | ×(6) Envoy | Status |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in sorted(rows, key=lambda r: r.scenario.key):
        load = row.load if row.ok else None
        lines.append("| " + " | ".join([
            row.scenario.key, row.scenario.title, _num(load.rps if load else None),
            _num(load.pct_ms.get(99.0) if load else None, "{:.2f}"),
            _ratio(row, _find(result.rows, "2", workers)),
            _ratio(row, _find(result.rows, "3", workers)),
            _ratio(row, _find(result.rows, "6", workers)),
            "ok" if row.ok else row.status,
        ]) + " |")
    lines += ["", *targets_table(result), README_END]
    return "\n".join(lines)
