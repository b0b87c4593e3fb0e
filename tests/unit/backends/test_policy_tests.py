"""The Rego test runner (plant_gateway.backends.policy_tests) on a small bundle of its own:
which rules count as tests, how each one is isolated, and what passes, fails or is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from plant_gateway.backends.policy_local import PolicyBundleError, load_sources
from plant_gateway.backends.policy_tests import (
    discover_tests,
    run_rego_tests,
    single_test_module,
)

MODULE = """package demo

import rego.v1

allow if input.user == "alice"
"""
TESTS = """package demo_test

import rego.v1

import data.demo

# a comment between rules
test_alice_allowed if {
	demo.allow with input as {"user": "alice"}
}

test_bob_allowed if {
	demo.allow with input as {"user": "bob"}
}

test_is_false := false

helper := 1
"""


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    (tmp_path / "demo.rego").write_text(MODULE)
    (tmp_path / "demo_test.rego").write_text(TESTS)
    return tmp_path


def test_discover_finds_every_test_rule_once(bundle: Path) -> None:
    assert discover_tests(load_sources(bundle)) == [
        "data.demo_test.test_alice_allowed",
        "data.demo_test.test_bob_allowed",
        "data.demo_test.test_is_false",
    ]


def test_single_test_module_keeps_one_test_and_everything_else() -> None:
    kept = single_test_module(TESTS, "test_bob_allowed")

    assert "test_bob_allowed" in kept
    assert "test_alice_allowed" not in kept
    assert "test_is_false" not in kept
    assert "helper := 1" in kept
    assert "import data.demo" in kept


def test_run_reports_passes_and_failures_in_discovery_order(bundle: Path) -> None:
    seen: list[str] = []

    results = run_rego_tests(bundle, on_result=lambda r: seen.append(r.name))

    assert [(r.name, r.passed) for r in results] == [
        ("data.demo_test.test_alice_allowed", True),
        ("data.demo_test.test_bob_allowed", False),
        ("data.demo_test.test_is_false", False),
    ]
    assert results[1].detail == "undefined"
    assert results[2].detail == "got False"
    assert sorted(seen) == sorted(r.name for r in results)


def test_a_test_file_that_does_not_compile_refuses_the_run(bundle: Path) -> None:
    (bundle / "broken_test.rego").write_text("package broken_test\n\ntest_x if {\n")

    with pytest.raises(PolicyBundleError, match="broken_test.rego"):
        run_rego_tests(bundle)
