"""``plant-gateway policy``: run the bundle's Rego tests, evaluate a decision for an input file.

``policy test`` says first how many tests it runs (they take seconds each batch), shows
``n/total`` on a terminal, and exits 1 naming every failed test when any test fails.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from plant_gateway.cli.common import USAGE_ERROR, fail, sub_app, usage_fail

policy_app = sub_app("Policy bundle: run Rego tests, evaluate decisions, build an OPA bundle.")
DirOption = Annotated[Path | None, typer.Option("--dir", "-d", help="bundle directory")]


def _policy_dir(value: Path | None) -> Path:
    if value is not None:
        return value
    from plant_gateway.settings import Settings

    return Path(Settings.model_fields["policy_dir"].default)


def _bundle_error(exc: Exception, given: Path | None) -> NoReturn:
    """A bundle that does not load: one line, naming ``--dir`` when the user gave it."""
    message = str(exc)
    if given is not None:
        message = message.replace("POLICY_DIR:", "--dir:", 1)
    fail(message, USAGE_ERROR)


class Progress:
    """``n/total`` on a terminal's stderr while the tests run (each runs in a child process)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.live = sys.stderr.isatty()

    def step(self) -> None:
        self.done += 1
        if self.live:
            sys.stderr.write(f"\r{self.done}/{self.total}")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.live and self.done:
            sys.stderr.write("\r" + " " * 24 + "\r")
            sys.stderr.flush()


@policy_app.command("test")
def test_command(
    policy_dir: DirOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="print passing tests")] = False,
) -> None:
    """Run every test_ rule of every package of the bundle."""
    from plant_gateway.backends.policy_local import PolicyBundleError, load_sources
    from plant_gateway.backends.policy_tests import (
        RegoTestResult,
        discover_tests,
        run_rego_tests,
    )

    directory = _policy_dir(policy_dir)
    started = time.perf_counter()
    try:
        total = len(discover_tests(load_sources(directory)))
    except PolicyBundleError as exc:
        _bundle_error(exc, policy_dir)
    if not total:
        fail(f"no test_ rules found in {directory}")
    typer.echo(f"running {total} policy tests from {directory} ...", err=True)
    progress = Progress(total)

    def show(result: RegoTestResult) -> None:
        if verbose or not result.passed:
            progress.clear()
            mark = "PASS" if result.passed else "FAIL"
            suffix = f": {result.detail}" if result.detail else ""
            typer.echo(f"{mark} {result.name}{suffix}")
        progress.step()

    try:
        results = run_rego_tests(directory, on_result=show)
    except PolicyBundleError as exc:
        progress.clear()
        _bundle_error(exc, policy_dir)
    progress.clear()
    failed = [r for r in results if not r.passed]
    elapsed = time.perf_counter() - started
    if failed:
        summary = f"{len(failed)} of {len(results)} policy tests FAILED ({elapsed:.1f}s):"
        typer.echo(f"\n{summary}", err=True)
        for result in failed:
            typer.echo(f"  {result.name}", err=True)
        raise typer.Exit(1)
    typer.echo(f"PASS: {len(results)} policy tests ({elapsed:.1f}s)")


@policy_app.command("eval")
def eval_command(
    input_file: Annotated[Path, typer.Option("--input", "-i", help="JSON input ('-' = stdin)")],
    policy_dir: DirOption = None,
    entrypoint: Annotated[str, typer.Option("--entrypoint", "-e")] = "plant/gateway/decision",
) -> None:
    """Print the decision document for one input (evaluated in-process)."""
    from plant_gateway.backends.base import DependencyError
    from plant_gateway.backends.policy_local import PolicyBundleError, compile_bundle, load_sources

    try:
        text = sys.stdin.read() if str(input_file) == "-" else input_file.read_text()
        document: Any = json.loads(text)
    except OSError as exc:
        usage_fail(f"--input: cannot read {str(input_file)!r}: {exc.strerror}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        usage_fail(f"--input: {str(input_file)!r} is not JSON: {exc}")
    if isinstance(document, dict) and "input" in document and len(document) == 1:
        document = document["input"]  # accept OPA's {"input": ...} request body too
    try:
        compiled = compile_bundle(load_sources(_policy_dir(policy_dir)), entrypoint.strip("/"))
    except PolicyBundleError as exc:
        _bundle_error(exc, policy_dir)
    try:
        decision = compiled.evaluate(json.dumps(document))
    except DependencyError as exc:
        fail(f"evaluation failed: {exc}")
    typer.echo(json.dumps(decision, indent=2, sort_keys=True))


@policy_app.command("bundle")
def bundle_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="archive to write (.tar.gz)")],
    policy_dir: DirOption = None,
) -> None:
    """Write the bundle as an OPA bundle archive (load it with: opa run --server --bundle FILE)."""
    from plant_gateway.backends import policy_bundle
    from plant_gateway.backends.policy_local import PolicyBundleError

    try:
        archive = policy_bundle.build(_policy_dir(policy_dir))
    except PolicyBundleError as exc:
        _bundle_error(exc, policy_dir)
    try:
        out.write_bytes(archive)
    except OSError as exc:
        usage_fail(f"--out: cannot write {str(out)!r}: {exc.strerror}")
    typer.echo(f"wrote {out} ({len(archive)} bytes, root 'plant', entry plant/gateway/decision)")


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")
