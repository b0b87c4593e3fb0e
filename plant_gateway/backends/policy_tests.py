"""The bundle's Rego test runner (``plant-gateway policy test``): every ``test_`` rule of every
package, each alone in an interpreter, in child processes: a test that crashes rego-cpp fails alone.

The engine that answers requests is ``policy_local``; this module only loads and compiles with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from regopy import RegoError

from plant_gateway.backends.policy_local import (
    BundleSources,
    PolicyBundleError,
    load_sources,
    new_interpreter,
)

PACKAGE_RE = re.compile(r"^\s*package\s+([\w.]+)", re.MULTILINE)
TEST_RULE_RE = re.compile(r"^(test_\w+)\b", re.MULTILINE)
RESULT_MARK = "@@rego-test-result "



@dataclass(slots=True)
class RegoTestResult:
    name: str
    passed: bool
    detail: str = ""


def discover_tests(sources: BundleSources) -> list[str]:
    """``data.<package>.<test_rule>`` for every ``test_`` rule of every module."""
    found: list[str] = []
    for source in {**sources.modules, **sources.tests}.values():
        package = PACKAGE_RE.search(source)
        if package is None:
            continue
        for rule in TEST_RULE_RE.findall(source):
            found.append(f"data.{package.group(1)}.{rule}")
    return list(dict.fromkeys(found))


def _top_level_blocks(source: str) -> list[str]:
    """Split a module into top-level statements (a block starts at a non-indented line)."""
    blocks: list[list[str]] = [[]]
    for line in source.splitlines():
        starts = line[:1] not in ("", " ", "\t", "#", "}", "]", ")")
        if starts and blocks[-1] and any(
            x.strip() and not x.startswith("#") for x in blocks[-1]
        ):
            blocks.append([])
        blocks[-1].append(line)
    return ["\n".join(b) for b in blocks]


def single_test_module(source: str, rule: str) -> str:
    """The module with every ``test_`` rule removed except ``rule``.

    rego-cpp compiles each ``with`` into rule copies, so a module holding many tests over the
    whole decision takes minutes; one test per interpreter takes milliseconds.
    """
    kept = []
    for block in _top_level_blocks(source):
        match = TEST_RULE_RE.search(block)
        first = next((x for x in block.splitlines() if x.strip() and not x.startswith("#")), "")
        if match and first.startswith("test_") and match.group(1) != rule:
            continue
        kept.append(block)
    return "\n".join(kept) + "\n"


def run_tests_inline(sources: BundleSources, names: list[str]) -> Iterator[RegoTestResult]:
    """Evaluate each named test rule in this process (rego-cpp may crash it: see run_rego_tests)."""
    owners = _test_owners(sources)
    for name in names:
        file, rule = owners[name]
        modules = {**sources.modules, file: single_test_module(sources.tests.get(file) or
                                                              sources.modules[file], rule)}
        try:
            interpreter = new_interpreter(modules, sources.data)
            interpreter.set_input_term("{}")
            output = interpreter.query(f"x := {name}")
            value = output.results[0].bindings.get("x") if output.ok() and output.results else None
        except (RegoError, ValueError, PolicyBundleError) as exc:
            yield RegoTestResult(name, False, f"error: {exc}")
            continue
        if not output.ok():
            yield RegoTestResult(name, False, f"error: {str(output)[:300]}")
        elif value is True:
            yield RegoTestResult(name, True)
        else:
            yield RegoTestResult(name, False, "undefined" if value is None else f"got {value!r}")


def _test_owners(sources: BundleSources) -> dict[str, tuple[str, str]]:
    owners: dict[str, tuple[str, str]] = {}
    for file, source in {**sources.modules, **sources.tests}.items():
        package = PACKAGE_RE.search(source)
        if package is None:
            continue
        for rule in TEST_RULE_RE.findall(source):
            owners.setdefault(f"data.{package.group(1)}.{rule}", (file, rule))
    return owners


def run_rego_tests(
    policy_dir: Path, *, on_result: Callable[[RegoTestResult], None] | None = None
) -> list[RegoTestResult]:
    """Run every ``test_`` rule of the bundle; a test passes only when it is ``true``.

    Tests run in a child process: a test that crashes rego-cpp fails (named), and the rest
    still run. Raises PolicyBundleError when the bundle (tests included) does not compile.
    """
    sources = load_sources(policy_dir)
    # Syntax errors anywhere (tests included) refuse the run; adding modules only parses them.
    new_interpreter({**sources.modules, **sources.tests}, sources.data)
    names = discover_tests(sources)
    workers = max(1, min(os.cpu_count() or 1, 4, len(names)))
    chunks = [names[k::workers] for k in range(workers)]
    lock = threading.Lock()

    def report(result: RegoTestResult) -> None:
        if on_result is not None:
            with lock:
                on_result(result)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(lambda chunk: _run_chunk(policy_dir, chunk, report), chunks))
    order = {name: k for k, name in enumerate(names)}
    return sorted((r for part in parts for r in part), key=lambda r: order.get(r.name, 0))


def _run_chunk(
    policy_dir: Path, names: list[str], report: Callable[[RegoTestResult], None]
) -> list[RegoTestResult]:
    results: list[RegoTestResult] = []
    remaining = names
    fruitless = 0
    while remaining:
        done = _run_child(policy_dir, remaining, results, report)
        if done == len(remaining):
            break
        crashed = RegoTestResult(remaining[done], False, "crashed the rego engine")
        results.append(crashed)
        report(crashed)
        fruitless = fruitless + 1 if done == 0 else 0
        remaining = remaining[done + 1 :] if fruitless < 3 else []
    return results


def _run_child(
    policy_dir: Path,
    names: list[str],
    results: list[RegoTestResult],
    on_result: Callable[[RegoTestResult], None] | None,
) -> int:
    command = [sys.executable, "-m", "plant_gateway.backends.policy_tests", str(policy_dir)]
    child = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(json.dumps(names))
    child.stdin.close()
    done = 0
    for line in child.stdout:
        if not line.startswith(RESULT_MARK):
            continue  # rego-cpp logs to stdout
        item = json.loads(line[len(RESULT_MARK) :])
        result = RegoTestResult(item["name"], item["passed"], item["detail"])
        results.append(result)
        done += 1
        if on_result is not None:
            on_result(result)
    child.wait()
    return done


def _child_main(argv: list[str]) -> None:
    sources = load_sources(Path(argv[0]))
    names = json.loads(sys.stdin.read())
    for result in run_tests_inline(sources, names):
        print(RESULT_MARK + json.dumps(dataclasses.asdict(result)), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
