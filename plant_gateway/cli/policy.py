"""``plant-gateway policy``: run the bundle's Rego tests, evaluate a decision for an input file.

``policy test`` exits non-zero (and names every failed test) when any test fails.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

policy_app = typer.Typer(
    help="Policy bundle: run Rego tests, evaluate decisions.", no_args_is_help=True
)
DirOption = Annotated[Path | None, typer.Option("--dir", "-d", help="bundle directory")]


def _policy_dir(value: Path | None) -> Path:
    if value is not None:
        return value
    from plant_gateway.settings import Settings

    return Path(Settings.model_fields["policy_dir"].default)


@policy_app.command("test")
def test_command(
    policy_dir: DirOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="print passing tests")] = False,
) -> None:
    """Run every test_ rule of every package of the bundle."""
    from plant_gateway.backends.policy_local import (
        PolicyBundleError,
        RegoTestResult,
        run_rego_tests,
    )

    directory = _policy_dir(policy_dir)
    started = time.perf_counter()

    def show(result: RegoTestResult) -> None:
        if verbose or not result.passed:
            mark = "PASS" if result.passed else "FAIL"
            suffix = f": {result.detail}" if result.detail else ""
            typer.echo(f"{mark} {result.name}{suffix}")

    try:
        results = run_rego_tests(directory, on_result=show)
    except PolicyBundleError as exc:
        typer.echo(f"ERROR {exc}", err=True)
        raise typer.Exit(2) from None
    failed = [r for r in results if not r.passed]
    elapsed = time.perf_counter() - started
    if not results:
        typer.echo(f"ERROR no test_ rules found in {directory}", err=True)
        raise typer.Exit(1)
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
    except (OSError, json.JSONDecodeError) as exc:
        typer.echo(f"ERROR --input: {exc}", err=True)
        raise typer.Exit(2) from None
    if isinstance(document, dict) and "input" in document and len(document) == 1:
        document = document["input"]  # accept OPA's {"input": ...} request body too
    try:
        compiled = compile_bundle(load_sources(_policy_dir(policy_dir)), entrypoint.strip("/"))
        decision = compiled.evaluate(json.dumps(document))
    except (PolicyBundleError, DependencyError) as exc:
        typer.echo(f"ERROR {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(decision, indent=2, sort_keys=True))


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")
