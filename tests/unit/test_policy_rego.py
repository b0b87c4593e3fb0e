"""The Rego tests of the bundle, run by the same runner as ``plant-gateway policy test``.

Also: a failing Rego test fails the command loudly, and a broken bundle is refused.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import TypedDict, Unpack

import pytest

from plant_gateway.backends.policy_local import LocalPolicyEngine, PolicyBundleError, load_sources
from plant_gateway.backends.policy_tests import discover_tests, run_rego_tests
from plant_gateway.settings import Settings

POLICIES = Path(__file__).resolve().parents[2] / "policies"


class SettingsOverrides(TypedDict, total=False):
    opa_decision_path: str


def settings_for(policy_dir: Path, **extra: Unpack[SettingsOverrides]) -> Settings:
    return Settings(plant_backend_url="http://127.0.0.1:9", policy_dir=policy_dir, **extra)


def test_bundle_rego_tests_all_pass() -> None:
    results = run_rego_tests(POLICIES)
    failed = [f"{r.name}: {r.detail}" for r in results if not r.passed]
    assert len(results) >= 60
    assert not failed, "\n".join(failed)


def test_every_policy_package_has_tests() -> None:
    names = discover_tests(load_sources(POLICIES))
    for package in ("main_test", "rbac_test", "trial_test", "governor_test", "sandbox_test"):
        assert any(f".{package}." in n for n in names), package


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    for test_file in target.glob("*_test.rego"):  # keep the run short: one small test file
        if test_file.name != "sandbox_test.rego":
            test_file.unlink()
    return target


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "plant_gateway.cli", "policy", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_policy_test_command_passes(bundle_copy: Path) -> None:
    done = run_cli("test", "--dir", str(bundle_copy))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PASS: 7 policy tests" in done.stdout
    # said before the tests run (they take seconds): not silent until the end
    assert done.stderr.splitlines()[0] == f"running 7 policy tests from {bundle_copy} ..."


def test_failing_rego_test_fails_the_command_loudly(bundle_copy: Path) -> None:
    (bundle_copy / "broken_test.rego").write_text(
        "package plant.gateway.broken_test\n\nimport rego.v1\n\n"
        "import data.plant.gateway.rbac\n\n"
        "test_viewer_may_delete if {\n"
        '\trbac.allowed with input.jwt as {"roles": ["viewer"]} '
        'with input.resource as "agents" with input.action as "delete"\n}\n'
    )
    done = run_cli("test", "--dir", str(bundle_copy))
    assert done.returncode == 1
    assert "FAIL data.plant.gateway.broken_test.test_viewer_may_delete" in done.stdout
    assert "1 of 8 policy tests FAILED" in done.stderr


def test_policy_test_command_refuses_test_syntax_error(bundle_copy: Path) -> None:
    (bundle_copy / "typo_test.rego").write_text("package x_test\n\ntest_x if {\n")
    done = run_cli("test", "--dir", str(bundle_copy))
    assert done.returncode == 2
    assert "typo_test.rego" in done.stderr


def test_syntax_error_refused_at_startup_with_clear_message(bundle_copy: Path) -> None:
    source = (bundle_copy / "rbac.rego").read_text()
    assert "allowed if input" in source
    broken = source.replace("allowed if input", "allowed if {{ input")
    (bundle_copy / "rbac.rego").write_text(broken)
    with pytest.raises(PolicyBundleError) as err:
        LocalPolicyEngine(settings_for(bundle_copy), watch=False)
    message = str(err.value)
    assert message.startswith("POLICY_DIR: ")
    assert "rbac.rego:" in message


def test_missing_entrypoint_refused(bundle_copy: Path) -> None:
    with pytest.raises(PolicyBundleError, match="entry point"):
        LocalPolicyEngine(settings_for(bundle_copy, opa_decision_path="plant/gateway/nope"),
                          watch=False)


def test_bad_data_json_refused(bundle_copy: Path) -> None:
    (bundle_copy / "data.json").write_text('{"plant": ')
    with pytest.raises(PolicyBundleError, match=r"data.json:1:"):
        LocalPolicyEngine(settings_for(bundle_copy), watch=False)


def test_policy_eval_prints_decision(tmp_path: Path) -> None:
    doc = tmp_path / "input.json"
    doc.write_text('{"jwt": {"roles": ["readonly"]}, "resource": "agents", "action": "create"}')
    done = run_cli("eval", "--input", str(doc))
    assert done.returncode == 0, done.stderr
    assert '"kind": "permission-denied"' in done.stdout
    assert '"required_permission": "agents:create"' in done.stdout
