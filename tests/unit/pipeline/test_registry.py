"""The guard registry: one list decides the pipeline, and guards stay self-contained units.

The import rule is checked over the real import graph: no guard reaches another guard through
the modules it imports when loaded, and the shared plumbing reaches no guard at all.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import plant_gateway
from plant_gateway import guards
from plant_gateway.deps import Dependencies
from plant_gateway.pipeline import registry
from plant_gateway.pipeline.step import GuardSpec, Phase
from plant_gateway.settings import Settings

PACKAGE_ROOT = Path(plant_gateway.__file__).parent
GUARD_MODULES = {f"plant_gateway.guards.{m.name}" for m in pkgutil.iter_modules(guards.__path__)}
PLUMBING_MODULES = {
    f"plant_gateway.pipeline.{m.name}"
    for m in pkgutil.iter_modules(importlib.import_module("plant_gateway.pipeline").__path__)
} - {"plant_gateway.pipeline.registry"}


def load_time_imports(source: str, module: str) -> set[str]:
    """The plant_gateway modules ``source`` imports when it is loaded: module-level imports,
    not those under ``if TYPE_CHECKING:`` nor inside functions (they run later, if ever)."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in [node] if not isinstance(node, ast.If | ast.Try) else ast.walk(node):
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1]
                                    + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
    return {name for name in found if name.startswith("plant_gateway")}


def source_of(module: str) -> str | None:
    path = PACKAGE_ROOT.parent / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = PACKAGE_ROOT.parent / module.replace(".", "/") / "__init__.py"
    return path.read_text() if path.is_file() else None  # a name imported from a module


def reached(module: str) -> set[str]:
    """Every plant_gateway module loading ``module`` loads (the transitive closure)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        source = source_of(current)
        if current in seen or source is None:
            continue
        seen.add(current)
        todo.extend(load_time_imports(source, current))
    return seen - {module}


@pytest.mark.parametrize("guard", sorted(GUARD_MODULES))
def test_a_guard_reaches_no_other_guard(guard: str) -> None:
    others = (GUARD_MODULES - {guard}) | {"plant_gateway.pipeline.registry"}
    assert reached(guard) & others == set()


@pytest.mark.parametrize("module", sorted(PLUMBING_MODULES))
def test_the_shared_plumbing_reaches_no_guard(module: str) -> None:
    assert reached(module) & (GUARD_MODULES | {"plant_gateway.pipeline.registry"}) == set()


def test_the_checker_sees_an_import_of_another_guard() -> None:
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from plant_gateway.guards.auth import AuthStep\n"
        "from .rate_limit import RateLimitStep\n"
        "if TYPE_CHECKING:\n    from plant_gateway.guards.budget import BudgetStep\n"
        "def later() -> None:\n    from plant_gateway.guards.policy import PolicyStep\n"
    )
    imports = load_time_imports(source, "plant_gateway.guards.example")
    assert {"plant_gateway.guards.auth", "plant_gateway.guards.rate_limit"} <= imports
    assert "plant_gateway.guards.budget" not in imports  # types only
    assert "plant_gateway.guards.policy" not in imports  # loaded on call, not with the module


def test_every_guard_module_is_registered_once() -> None:
    registered = [spec for spec in registry.PIPELINE if isinstance(spec, GuardSpec)]
    names = [spec.name for spec in registered]
    assert len(names) == len(set(names))
    for module in GUARD_MODULES:
        spec = importlib.import_module(module).GUARD
        assert spec in registered, f"{module} declares a guard the registry does not list"


def test_phases_never_go_back() -> None:
    assert registry.phases_in_order()
    phases = [spec.phase for spec in registry.PIPELINE]
    assert phases[0] == Phase.INGRESS and Phase.ADMIT in phases


def test_the_guard_names_are_derived_from_the_registry() -> None:
    assert registry.switches() == (
        "ip_access", "auth", "rate_limit", "policy", "budget", "tenant", "audit",
    )
    assert "ip_access" not in registry.default_switches()  # opt-in
    assert Settings(plant_backend_url="http://b").guards == list(registry.default_switches())
    with pytest.raises(ValueError, match="unknown guard"):
        Settings(plant_backend_url="http://b", guards=["auth", "waf"])


def full_settings() -> Settings:
    return Settings(plant_backend_url="http://b", jwt_secret="s" * 32)


def test_switching_a_guard_off_removes_it_and_its_riders() -> None:
    s = full_settings()
    deps = Dependencies(settings=s, counters=None, flags=None)  # type: ignore[arg-type]
    names = [step.name for step in registry.build_pipeline(s, deps)]
    assert names == ["ingress", "routes", "auth", "rate_limit", "policy", "trial_quota",
                     "budget", "counter_batch", "tenant"]
    no_limits = s.model_copy(update={"guards": ["auth", "tenant"]})
    names = [step.name for step in registry.build_pipeline(no_limits, deps)]
    assert names == ["ingress", "routes", "auth", "counter_batch", "tenant"]
    bare = s.model_copy(update={"guards": ["tenant"]})
    names = [step.name for step in registry.build_pipeline(bare, deps)]
    assert names == ["ingress", "routes", "tenant"]  # no batched guard: no counter batch step


def test_batched_guards_enqueue_only_with_a_counter_batch_step() -> None:
    s = full_settings()
    deps = Dependencies(settings=s, counters=None, flags=None)  # type: ignore[arg-type]
    steps = registry.build_pipeline(s, deps)
    batched = {spec.name for spec in registry.GUARDS if spec.batched}
    assert batched == {"auth", "rate_limit", "policy", "trial_quota", "budget"}
    for step in steps:
        if step.name in batched:
            assert step.batched is True  # type: ignore[attr-defined]


def test_no_step_keeps_the_whole_settings() -> None:
    s = full_settings()
    deps = Dependencies(settings=s, counters=None, flags=None)  # type: ignore[arg-type]
    for step in registry.build_pipeline(s, deps):
        if step.name in registry.PLUMBING:
            continue
        kept = [v for v in vars(step).values() if isinstance(v, Settings)]
        assert kept == [], f"{step.name} keeps Settings and could read them per request"
