"""Command line of the benchmark: ``python -m bench [--quick] [--mix ...] [--workers 1,2]``.

Writes bench/results/latest.md (quick runs: bench/results/quick.md) and, for full runs, the
README's Benchmark section.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from bench.report import update_readme, write_outputs
from bench.runner import Options, run
from bench.scenarios import POSTGRES_ADMIN_DSN, REDIS_URL, SCENARIOS, Services
from bench.tools import REPO
from bench.traffic import parse_mix

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="a few seconds per scenario")
    p.add_argument("--duration", type=int, help="seconds per measured run (default 10, quick 2)")
    p.add_argument("--warmup", type=int, help="warm-up seconds (default 2, quick 1)")
    p.add_argument("--fixed-duration", type=int, help="seconds of the fixed-rate run")
    p.add_argument("--repeats", type=int, help="measured runs per gateway scenario (default 2)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--workers", default="1", help="comma list of worker counts, e.g. 1,2")
    p.add_argument("--mix", default="none",
                   help="denied shares, e.g. 'bad_token=0.05,policy_deny=0.05,rate_limited=0.05'"
                        " or 'realistic'; default: all requests allowed")
    p.add_argument("--users", type=int, default=100, help="distinct users/tokens")
    p.add_argument("--rate", type=float,
                   help="fixed rate (default: 50%% of the slowest gateway scenario's peak)")
    p.add_argument("--scenarios", default="",
                   help="comma list of keys to run: " + ",".join(s.key for s in SCENARIOS))
    p.add_argument("--redis-url", default=REDIS_URL, help="Redis of scenario 5")
    p.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_DSN,
                   help="PostgreSQL DSN allowed to CREATE DATABASE (scenario 5)")
    p.add_argument("--full-guards", default="auth,rate_limit,policy,budget,tenant,audit",
                   help="guards of the full-chain scenarios 4 and 5 (to cost guards one by one)")
    p.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of the gateway scenarios (repeatable), e.g. "
                        "LOG_LEVEL=INFO; '{backend}' in a value is the backend's URL")
    p.add_argument("--trace-sample-rate", type=float,
                   help="TRACE_SAMPLE_RATE of the gateway scenarios; spans are exported over "
                        "OTLP/HTTP to the static backend, which answers 200 to every POST")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the gateway scenarios (bench/results/profile-*.md)")
    p.add_argument("--no-install", action="store_true", help="do not apt/pip install tools")
    p.add_argument("--out", type=Path, help="Markdown output path")
    p.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    quick = bool(args.quick)
    return Options(
        duration_s=args.duration or (2 if quick else 10),
        warmup_s=args.warmup if args.warmup is not None else (1 if quick else 2),
        fixed_s=args.fixed_duration or (1 if quick else 10),
        repeats=args.repeats or (1 if quick else 2),
        connections=args.connections,
        threads=args.threads,
        workers=tuple(int(w) for w in args.workers.split(",") if w.strip()),
        mix=parse_mix(args.mix, args.users),
        rate=args.rate,
        only=tuple(k.strip() for k in args.scenarios.split(",") if k.strip()),
        install=not args.no_install,
        quick=quick,
        services=Services(args.redis_url, args.postgres_admin_url),
        profile_dir=RESULTS if args.profile else None,
        full_guards=tuple(g.strip() for g in args.full_guards.split(",") if g.strip()),
        gateway_env=gateway_env(args.gateway_env, args.trace_sample_rate),
    )


def gateway_env(pairs: list[str], trace_rate: float | None) -> tuple[tuple[str, str], ...]:
    """``--gateway-env`` pairs, plus the tracing settings ``--trace-sample-rate`` stands for."""
    out: list[tuple[str, str]] = []
    if trace_rate is not None:
        out += [("TRACE_SAMPLE_RATE", f"{trace_rate:g}"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "{backend}")]
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--gateway-env {pair!r}: expected NAME=VALUE")
        out.append((name.strip(), value))
    return tuple(out)


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (e.g. from `timeout`) into SystemExit so every server is stopped."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    _exit_on_sigterm()
    args = parse_args(argv)
    try:
        options = options_from(args)
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    result = run(options, say=lambda line: print(line, flush=True))
    out = args.out or RESULTS / ("quick.md" if options.quick else "latest.md")
    write_outputs(result, out)
    print(f"[bench] table written to {out}")
    if not options.quick and not args.no_readme and out.resolve().parent == RESULTS:
        if update_readme(result, REPO / "README.md", "bench/results/latest.md"):
            print("[bench] README.md Benchmark section updated")
        else:
            print("[bench] no README.md yet: Benchmark section not written")
    failed = [r for r in result.rows if r.status == "failed"]
    for row in failed:
        print(f"[bench] FAILED {row.scenario.key} ({row.workers}w): {row.reason}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
