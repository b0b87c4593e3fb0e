"""Deployment assets: every Terraform file parses, the stack's invariants hold, workflows are sane.

Stands in for ``terraform validate`` where no provider can be downloaded; runs ``terraform fmt``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TF = ROOT / "deploy" / "terraform"
STACK = TF / "stacks" / "plant"
MODULE = TF / "modules" / "cloud_run_service"
WORKFLOWS = ROOT / "deploy" / "github" / "workflows"
ENVIRONMENTS = ("demo", "uat", "prod")
CI_SUPPLIED_VARS = {"plant_gateway_image", "plant_backend_image", "opa_image"}
TF_FILES = sorted(TF.rglob("*.tf")) + sorted(TF.rglob("*.tfvars"))


def unq(value: Any) -> Any:
    """python-hcl2 keeps string literals quoted; strip one pair of quotes."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def load(path: Path) -> dict[str, Any]:
    with path.open() as fh:
        return hcl2.load(fh)


def load_dir(directory: Path) -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = {}
    for path in sorted(directory.glob("*.tf")):
        for key, value in load(path).items():
            if key != "__comments__":
                merged.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    return merged


def blocks(doc: dict[str, list[Any]], kind: str) -> dict[str, dict[str, Any]]:
    """``variable``/``module``/``output`` blocks by unquoted name."""
    return {unq(name): body for item in doc.get(kind, []) for name, body in item.items()}


def resources(doc: dict[str, list[Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for item in doc.get("resource", []):
        for rtype, named in item.items():
            for name, body in named.items():
                out[(unq(rtype), unq(name))] = body
    return out


def referenced(pattern: str, directory: Path) -> set[str]:
    text = "\n".join(p.read_text() for p in directory.glob("*.tf"))
    return set(re.findall(pattern, text))


# --- parsing ----------------------------------------------------------------------------------


def test_terraform_files_exist() -> None:
    names = {p.relative_to(TF).as_posix() for p in TF_FILES}
    assert {"modules/cloud_run_service/main.tf", "stacks/plant/main.tf"} <= names
    assert {f"environments/{env}.tfvars" for env in ENVIRONMENTS} <= names


@pytest.mark.parametrize("path", TF_FILES, ids=lambda p: p.relative_to(TF).as_posix())
def test_every_terraform_file_parses(path: Path) -> None:
    assert isinstance(load(path), dict)


@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform binary not installed")
def test_terraform_fmt_check() -> None:
    result = subprocess.run(
        ["terraform", "fmt", "-check", "-recursive", "-diff", str(TF)],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "TF_CLI_CONFIG_FILE": "/dev/null"},
    )
    assert result.returncode == 0, result.stdout


# --- consistency (what terraform validate would catch) ----------------------------------------


@pytest.mark.parametrize("directory", [STACK, MODULE], ids=["stack", "module"])
def test_every_var_reference_is_declared(directory: Path) -> None:
    declared = set(blocks(load_dir(directory), "variable"))
    used = referenced(r"\bvar\.([A-Za-z_][A-Za-z0-9_]*)", directory)
    assert used - declared == set()


def test_module_calls_match_module_variables() -> None:
    module_vars = blocks(load_dir(MODULE), "variable")
    required = {name for name, body in module_vars.items() if "default" not in body}
    meta = {"source", "depends_on", "providers", "count", "for_each", "__is_block__",
            "__comments__"}
    for name, call in blocks(load_dir(STACK), "module").items():
        given = set(call) - meta
        assert given - set(module_vars) == set(), f"module {name}: unknown inputs"
        assert required - given == set(), f"module {name}: missing inputs"


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_tfvars_set_every_required_variable(env: str) -> None:
    variables = blocks(load_dir(STACK), "variable")
    required = {n for n, body in variables.items() if "default" not in body} - CI_SUPPLIED_VARS
    values = {k for k in load(TF / "environments" / f"{env}.tfvars") if not k.startswith("__")}
    assert required - values == set()
    assert values - set(variables) == set(), "tfvars sets undeclared variables"
    assert unq(load(TF / "environments" / f"{env}.tfvars")["environment"]) == env


# --- invariants of the stack (README → Deploy) -------------------------------------------------


def gateway() -> dict[str, Any]:
    return blocks(load_dir(STACK), "module")["plant_gateway"]


def test_gateway_service_shape() -> None:
    gw = gateway()
    assert gw["port"] == 8000
    assert unq(gw["cpu"]) == "1"
    assert unq(gw["memory"]) == "512Mi"
    assert gw["min_instances"] == "${var.gateway_min_instances}"
    assert gw["max_instances"] == "${var.gateway_max_instances}"
    assert unq(gw["health_path"]) == "/health"
    assert "google_vpc_access_connector" in gw["vpc_connector"]
    assert "connection_name" in gw["cloud_sql_instances"][0]
    for env in ENVIRONMENTS:
        tfvars = load(TF / "environments" / f"{env}.tfvars")
        assert (tfvars["gateway_min_instances"], tfvars["gateway_max_instances"]) == (1, 10)


def test_gateway_secrets_and_env() -> None:
    main = (STACK / "main.tf").read_text()
    secrets_block = main.split("gateway_secrets = {", 1)[1].split("}\n  }", 1)[0]
    for name in ("DATABASE_URL", "JWT_SECRET", "LAUNCHDARKLY_SDK_KEY", "CP_REGISTRATION_KEY",
                 "REDIS_URL"):
        assert re.search(rf"^\s*{name}\s*=", secrets_block, re.M), name
    # the chain key is opt-in: a deployment without that secret still deploys
    optional_block = main.split("gateway_optional_secrets =", 1)[1].split("\n  }\n", 1)[0]
    assert "AUDIT_CHAIN_KEY = { secret = var.secret_ids.audit_chain_key }" in optional_block
    assert "audit_chain_key      = optional(string)" in (STACK / "variables.tf").read_text()
    env_vars = gateway()["env_vars"]
    for name in ("ENVIRONMENT", "PLANT_BACKEND_URL", "OPA_SERVICE_URL",
                 "CLOUD_SQL_CONNECTION_NAME", "GATEWAY_TYPE"):
        assert f"{name} =" in env_vars, name
    assert "REDIS_HOST" not in main  # the seed's hard-coded 10.0.0.3 is gone
    assert "google_redis_instance.plant.host" in main


def test_backend_and_opa_are_internal_and_invoked_only_by_the_gateway() -> None:
    modules = blocks(load_dir(STACK), "module")
    for name in ("plant_backend", "opa"):
        assert unq(modules[name]["ingress"]) == "INGRESS_TRAFFIC_INTERNAL_ONLY", name
        assert [unq(m) for m in modules[name]["invoker_members"]] == [
            "serviceAccount:${google_service_account.gateway.email}"
        ], name
    assert unq(gateway()["ingress"]) == "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"
    assert unq(gateway()["vpc_egress"]) == "ALL_TRAFFIC"  # so internal ingress admits it


SERVICE_ACCOUNT_REF = r"\$\{(google_service_account\.\w+)\.email\}"


def test_callers_of_internal_only_services_egress_through_the_connector() -> None:
    """Internal-only ingress admits a Cloud Run caller only if its call leaves via the VPC."""
    modules = blocks(load_dir(STACK), "module")
    by_identity = {re.sub(SERVICE_ACCOUNT_REF, r"\1", body["service_account_email"]): name
                   for name, body in modules.items()}
    internal = [name for name, body in modules.items()
                if unq(body["ingress"]) == "INGRESS_TRAFFIC_INTERNAL_ONLY"]
    assert {"plant_backend", "opa"} <= set(internal)
    for callee in internal:
        for member in modules[callee]["invoker_members"]:
            identity = re.fullmatch(f"serviceAccount:{SERVICE_ACCOUNT_REF}", unq(member))
            assert identity, f"{callee}: invoker {member} is not a service account of this stack"
            caller = modules[by_identity[identity.group(1)]]
            assert "google_vpc_access_connector" in caller.get("vpc_connector", ""), callee
            assert unq(caller.get("vpc_egress")) == "ALL_TRAFFIC", callee


@pytest.mark.parametrize("directory", [STACK, MODULE], ids=["stack", "module"])
def test_every_data_source_is_used(directory: Path) -> None:
    declared = {(unq(kind), unq(name)) for item in load_dir(directory).get("data", [])
                for kind, named in item.items() for name in named}
    used = {tuple(ref) for ref in referenced(r"\bdata\.(\w+)\.(\w+)", directory)}
    assert declared - used == set(), "declared but never referenced"


def test_load_balancer_routes_to_the_gateway() -> None:
    res = resources(load_dir(STACK))
    neg = res[("google_compute_region_network_endpoint_group", "gateway")]
    assert unq(neg["network_endpoint_type"]) == "SERVERLESS"
    assert neg["cloud_run"][0]["service"] == "${module.plant_gateway.name}"
    backend = res[("google_compute_backend_service", "gateway")]
    assert "region_network_endpoint_group.gateway" in backend["backend"][0]["group"]
    assert "backend_service.gateway" in res[("google_compute_url_map", "plant")]["default_service"]
    proxy = res[("google_compute_target_https_proxy", "plant")]
    assert "managed_ssl_certificate" in proxy["ssl_certificates"][0]
    rule = res[("google_compute_global_forwarding_rule", "https")]
    assert unq(rule["port_range"]) == "443"
    assert "target_https_proxy" in rule["target"]
    assert ("google_redis_instance", "plant") in res


# --- provider version ---------------------------------------------------------------------------

# Arguments used here that older google providers reject as unsupported (terraform validate would).
PROVIDER_MIN_FOR = {("google_cloud_run_v2_service", "deletion_protection"): (6, 0)}


def google_lower_bound(versions_tf: Path) -> tuple[int, ...]:
    providers = load(versions_tf)["terraform"][0]["required_providers"][0]
    constraint = unq(providers["google"]["version"])
    match = re.search(r">=\s*([\d.]+)", constraint)
    assert match, f"{versions_tf}: no lower bound in {constraint!r}"
    return tuple(int(part) for part in match.group(1).split("."))


def test_google_provider_lower_bound_knows_every_argument_used() -> None:
    needed = max(
        (version for directory in (STACK, MODULE)
         for (rtype, _), body in resources(load_dir(directory)).items()
         for (kind, arg), version in PROVIDER_MIN_FOR.items() if kind == rtype and arg in body),
        default=(0,),
    )
    assert needed == (6, 0)  # the module sets deletion_protection
    for directory in (STACK, MODULE):
        assert google_lower_bound(directory / "versions.tf") >= needed, directory.name


# --- workflows --------------------------------------------------------------------------------


WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.yml"))


def test_workflows_exist() -> None:
    assert {p.name for p in WORKFLOW_FILES} >= {"ci.yml", "deploy.yml"}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_jobs_have_timeouts_and_concurrency(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc.get("on", doc.get(True)), "no triggers"  # YAML 1.1 reads `on` as True
    assert doc["concurrency"]["group"]
    for name, job in doc["jobs"].items():
        assert 0 < int(job["timeout-minutes"]) <= 30, name
        assert job.get("steps"), name
        for need in [job["needs"]] if isinstance(job.get("needs"), str) else job.get("needs", []):
            assert need in doc["jobs"], f"{name} needs unknown job {need}"


def test_deploy_workflow_order_and_guards() -> None:
    doc = yaml.safe_load((WORKFLOWS / "deploy.yml").read_text())
    assert doc["concurrency"]["cancel-in-progress"] is False  # never kill an apply midway
    jobs = doc["jobs"]
    assert jobs["plan"]["needs"] == ["build"] and jobs["apply"]["needs"] == ["plan"]
    plan_steps = [s.get("run", "") for s in jobs["plan"]["steps"]]
    fmt = next(i for i, s in enumerate(plan_steps) if "fmt -check" in s)
    plan = next(i for i, s in enumerate(plan_steps) if "terraform -chdir" in s and " plan " in s)
    validate = next(i for i, s in enumerate(plan_steps) if "validate" in s)
    assert fmt < validate < plan
    assert all("-lock-timeout" in s for s in plan_steps if " plan " in s)
    assert any("plant-gateway verify" in s.get("run", "") for s in jobs["verify"]["steps"])
    ci = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    runs = " ".join(s.get("run", "") for j in ci["jobs"].values() for s in j["steps"])
    for command in ("ruff check", "mypy", "./scripts/test", "terraform fmt -check", "validate"):
        assert command in runs, command


# --- image ------------------------------------------------------------------------------------


def test_dockerfile_invariants() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.M)
    assert len(stages) >= 2, "multi-stage"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    final = text.rsplit("\nFROM ", 1)[1]
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user and not user[-1].startswith(("root", "0")), "runs as non-root"
    assert re.search(r"^HEALTHCHECK .*", final, re.M)
    assert "/health" in final and "curl" not in final.split("HEALTHCHECK", 1)[1]
    assert "PORT" in final
    assert re.search(r'^CMD \["plant-gateway", "serve"\]', final, re.M)


def test_ci_image_job_fails_when_the_container_does_not_answer() -> None:
    ci = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    script = "\n".join(s.get("run", "") for s in ci["jobs"]["image"]["steps"])
    # A `for ...; do curl ... && break; sleep 2; done` poll exits 0 even when nothing answered.
    outside_loops = re.sub(r"^\s*for .*?done\s*$", "", script, flags=re.M)
    for path in ("/health", "/ready"):
        assert re.search(rf"curl -f\S* \S+{path}\b", outside_loops), path
    assert 'test "$(docker exec' not in script  # a failed exec reads as a non-root uid


# Shared libraries python:3.11-slim (Debian bookworm) already has: glibc, libgcc, libstdc++, zlib.
SLIM_BASE_LIBS = frozenset({
    "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libresolv.so.2",
    "libutil.so.1", "ld-linux-x86-64.so.2", "libgcc_s.so.1", "libstdc++.so.6", "libz.so.1",
})
# Debian package providing each other library a runtime dependency links against.
DEBIAN_PACKAGE = {"libatomic.so.1": "libatomic1"}


def runtime_distributions() -> set[str]:
    """plant-gateway and its runtime dependencies (no extras), as installed in this environment."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = ["plant-gateway"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.distribution(name).requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def system_libraries(distributions: set[str]) -> dict[str, str]:
    """Library => one file needing it, for ELF files of the distributions linking outside them."""
    from importlib import metadata

    needs: dict[str, str] = {}
    for name in sorted(distributions):
        for file in metadata.distribution(name).files or []:
            path = Path(str(file.locate()))
            if not path.is_file() or path.open("rb").read(4) != b"\x7fELF":
                continue
            out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, timeout=30)
            for lib, target in re.findall(r"^\s*(\S+) => (.+?)(?: \(0x[0-9a-f]+\))?$",
                                          out.stdout, re.M):
                if "site-packages" not in target:  # vendored libraries travel with the wheel
                    needs.setdefault(lib, str(path))
    return needs


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd not installed")
def test_runtime_stage_installs_every_shared_library_the_dependencies_need() -> None:
    final = (ROOT / "deploy" / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    installs = " ".join(re.findall(r"apt-get install ([^&]+)", final))
    needs = system_libraries(runtime_distributions())
    assert "libatomic.so.1" in needs  # regopy's librego_shared.so: the check sees real links
    for lib, user in sorted(needs.items()):
        if lib in SLIM_BASE_LIBS:
            continue
        assert lib in DEBIAN_PACKAGE, f"{user} needs {lib}: add its Debian package"
        assert re.search(rf"\b{DEBIAN_PACKAGE[lib]}\b", installs), f"{user} needs {lib}"
