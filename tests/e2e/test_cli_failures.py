"""Every ``plant-gateway`` command with bad input, as a real process: one line on stderr naming
the setting or the cause, exit code 2 for usage and configuration, 1 at run time, never a
traceback; plus the surprises of issue 16 (silent audit query, unasked downgrade, ...)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from plant_gateway import migrations
from tests.fixtures.postgres import create_database, drop_database
from tests.fixtures.processes import JWT_SECRET, KEEP_ENV, free_port

SCRIPT = Path(sys.executable).with_name("plant-gateway")
CLI = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "plant_gateway.cli"]
BAD_PEM = "-----BEGIN PUBLIC KEY-----\\ngarbage\\n-----END PUBLIC KEY-----"
CLOSED = "postgresql://postgres@127.0.0.1:{closed}/audit"


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    code: int
    says: str  # part of the one line on stderr
    env: dict[str, str | None] = field(default_factory=dict)

    def __str__(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{extra} {' '.join(self.args)}".strip()


CASES = [
    Case(("nope",), 2, "No such command 'nope'"),
    # serve: settings, then what start-up builds before listening
    Case(("serve",), 2, "config error: PLANT_BACKEND_URL: is required",
         {"PLANT_BACKEND_URL": None}),
    Case(("serve",), 2, "config error: PLANT_BACKEND_URL: has no host",
         {"PLANT_BACKEND_URL": "http://"}),
    Case(("serve",), 2, "config error: JWT_SECRET: must be at least 32", {"JWT_SECRET": "x"}),
    Case(("serve",), 2, "config error: JWT_PUBLIC_KEY:", {"JWT_PUBLIC_KEY": BAD_PEM}),
    Case(("serve",), 2, "config error: REDIS_URL: must be", {"REDIS_URL": "garbage"}),
    Case(("serve",), 2, "config error: DATABASE_URL: must be", {"DATABASE_URL": "garbage"}),
    Case(("serve",), 2, "config error: POLICY_DIR:", {"POLICY_DIR": "{tmp}/none"}),
    Case(("serve",), 2, "config error: FLAGS_FILE:", {"FLAGS_FILE": "{tmp}/none.yaml"}),
    Case(("serve",), 2, "config error: PLANT_STATE_DIR: cannot create",
         {"PLANT_STATE_DIR": "{file}/state"}),
    Case(("serve",), 2, "config error: PORT:", {"PORT": "99999"}),
    Case(("serve", "--port", "abc"), 2, "Invalid value for '--port'"),
    Case(("serve", "--workers", "0"), 2, "Invalid value for '--workers'"),
    Case(("serve", "--config", "{tmp}/none.yaml"), 2, "config error: PLANT_CONFIG: config file"),
    Case(("serve", "--config", "{bad_yaml}"), 2, "is not valid YAML at line 2"),
    Case(("serve", "--config", "{typo_yaml}"), 2,
         "unknown key 'plant_backend_ur' in {typo_yaml} (did you mean 'plant_backend_url'?)"),
    # token
    Case(("token", "mint", "--private-key", "{tmp}/none.pem"), 2,
         "Invalid value for '--private-key': file"),
    Case(("token", "mint", "--private-key", "{file}"), 2, "is not an unencrypted PEM private key"),
    Case(("token", "mint", "--secret", "x"), 2, "JWT_SECRET: the secret (--secret) must be"),
    Case(("token", "mint", "--ttl", "-5"), 2, "Invalid value for '--ttl'"),
    Case(("token", "mint"), 2, "config error: JWT_SECRET: not set", {"JWT_SECRET": None}),
    Case(("token", "mint", "--claim", "oops"), 2, "--claim expects key=value"),
    Case(("token", "mint", "--alg", "RS256"), 2, "--alg needs --private-key"),
    Case(("token", "mint", "--private-key", "{file}", "--alg", "HS256"), 2, "'--alg'"),
    Case(("token", "revoke"), 2, "give exactly one of --jti or --token"),
    Case(("token", "revoke", "--token", "garbage"), 2, "not a JWT"),
    Case(("token", "revoke", "--jti", "j1"), 2, "config error: REDIS_URL: not set"),
    Case(("token", "revoke", "--jti", "j1"), 1, "(REDIS_URL) does not answer",
         {"REDIS_URL": "redis://127.0.0.1:{closed}/0"}),
    Case(("token", "invalidate-user", "u1"), 2, "config error: REDIS_URL: must be",
         {"REDIS_URL": "garbage"}),
    # policy
    Case(("policy", "test", "--dir", "{tmp}/none"), 2, "--dir: policy directory"),
    Case(("policy", "test", "--dir", "{empty_dir}"), 2, "no .rego files"),
    Case(("policy", "eval"), 2, "Missing option '--input'"),
    Case(("policy", "eval", "--input", "{tmp}/none.json"), 2, "--input: cannot read"),
    Case(("policy", "eval", "--input", "{file}"), 2, "is not JSON"),
    Case(("policy", "eval", "--input", "{json}", "--entrypoint", "no/such"), 2, "'no/such'"),
    # db
    Case(("db", "upgrade", "nope", "--database-url", "{empty_db}"), 2,
         "Can't locate revision identified by 'nope'"),
    Case(("db", "current", "--database-url", CLOSED), 1, "audit database postgresql://"),
    Case(("db", "current"), 2, "config error: DATABASE_URL: must be", {"DATABASE_URL": "garbage"}),
    Case(("db", "current"), 2, "holds no embedded PostgreSQL"),
    Case(("db", "downgrade", "--database-url", "{migrated_db}"), 2, "pass --yes to confirm"),
    Case(("db", "downgrade", "--state-dir", "{tmp}/none"), 2, "holds no embedded PostgreSQL"),
    # audit
    Case(("audit", "query", "--database-url", "{migrated_db}"), 2,
         "--as-admin, --as-user ID or --as-customer-admin ID"),
    Case(("audit", "tail", "--database-url", "{migrated_db}"), 2, "--as-admin"),
    Case(("audit", "query", "--as-admin"), 2, "PLANT_STATE_DIR '.plant-gateway' holds no",
         {"PLANT_STATE_DIR": None}),
    Case(("audit", "query", "--as-admin", "--database-url", "{empty_db}"), 1, "no audit schema"),
    Case(("audit", "tail", "--as-admin", "--database-url", "{empty_db}"), 1, "no audit schema"),
    Case(("audit", "verify", "--database-url", "{empty_db}"), 1,
         "run 'plant-gateway db upgrade' first"),
    Case(("audit", "verify", "--database-url", CLOSED), 1, "audit database postgresql://"),
    Case(("audit", "query", "--as-admin", "--since", "yesterday"), 2, "'--since'"),
    # verify, demo
    Case(("verify",), 2, "Missing option '--url'"),
    Case(("verify", "--url", "garbage"), 2, "--url: 'garbage' is not an http"),
    Case(("verify", "--url", "http://127.0.0.1:9", "--database-url", "garbage"), 2,
         "--database-url: must be a postgresql:// URL"),
    Case(("demo", "--port", "0"), 2, "Invalid value for '--port'"),
    Case(("demo", "--port", "{port}", "--backend-port", "{closed}"), 2,
         "config error: REDIS_URL: must be", {"REDIS_URL": "garbage"}),
]


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
        stdin=subprocess.DEVNULL, check=False,
    )


def clean_env(**extra: str | None) -> dict[str, str]:
    env: dict[str, str | None] = {k: os.environ[k] for k in KEEP_ENV if k in os.environ}
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture(scope="module")
def databases(postgres_dsn: str) -> Iterator[dict[str, str]]:
    """A database without the audit schema and one migrated to head (both dropped after)."""
    empty = create_database(postgres_dsn, prefix="pgw_cli_empty")
    migrated = create_database(postgres_dsn, prefix="pgw_cli")
    migrations.upgrade(migrated)
    yield {"empty_db": empty, "migrated_db": migrated}
    drop_database(empty)
    drop_database(migrated)


@pytest.fixture
def values(tmp_path: Path, databases: dict[str, str]) -> dict[str, str]:
    (tmp_path / "file.txt").write_text("hello, not a key, not JSON\n")
    (tmp_path / "in.json").write_text("{}")
    (tmp_path / "bad.yaml").write_text("plant_guards: [auth\n")
    (tmp_path / "typo.yaml").write_text("plant_backend_ur: http://127.0.0.1:9\n")
    (tmp_path / "empty").mkdir()
    return {
        "tmp": str(tmp_path), "file": str(tmp_path / "file.txt"), "json": str(tmp_path / "in.json"),
        "bad_yaml": str(tmp_path / "bad.yaml"), "typo_yaml": str(tmp_path / "typo.yaml"),
        "empty_dir": str(tmp_path / "empty"), "port": str(free_port()),
        "closed": str(free_port()), **databases,  # nothing listens on a free port
    }


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_one_line_and_an_exit_code(
    case: Case, values: dict[str, str], tmp_path: Path
) -> None:
    base: dict[str, str | None] = {
        "PLANT_BACKEND_URL": "http://127.0.0.1:9", "JWT_SECRET": JWT_SECRET, "HOST": "127.0.0.1",
        "PORT": values["port"], "PLANT_STATE_DIR": f"{tmp_path}/state",
    }
    base.update({k: v and v.format_map(values) for k, v in case.env.items()})
    env = clean_env(**base)
    done = run([arg.format_map(values) for arg in case.args], env, tmp_path)
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert case.says.format_map(values) in lines[0]
    assert done.returncode == case.code, done.stderr
    assert done.stdout == ""
    # nothing was created to fail in: no embedded PostgreSQL, no state in the working folder
    assert not (tmp_path / "none").exists() and not (tmp_path / ".plant-gateway").exists()


def test_a_group_without_its_command_prints_its_help(tmp_path: Path) -> None:
    for args in ([], ["token"], ["db"]):
        done = run(args, clean_env(), tmp_path)
        assert done.returncode == 2
        assert done.stderr.startswith(f"Usage: plant-gateway {' '.join(args)}".rstrip())
        assert "Traceback" not in done.stderr


def test_help_shows_no_type_after_a_flag_and_token_names_mint(tmp_path: Path) -> None:
    group = run(["token", "--help"], clean_env(), tmp_path)
    assert group.returncode == 0
    assert "mint" in group.stdout.split("Options:")[0]  # the group's own description
    for command in (["token", "mint"], ["audit", "query"], []):
        done = run([*command, "--help"], clean_env(), tmp_path)
        assert done.returncode == 0 and "<bool>" not in done.stdout, done.stdout
    mint = run(["token", "mint", "--help"], clean_env(), tmp_path).stdout
    assert "--trial  " in mint and "--ttl <int range>" in mint


def test_serve_failing_inside_the_server_is_one_json_line(tmp_path: Path) -> None:
    """What only the running server finds (here: a Cluster on a Unix socket) is named in one
    JSON log line, exit code 1, no traceback in any line."""
    env = clean_env(
        PLANT_BACKEND_URL="http://127.0.0.1:9", JWT_SECRET=JWT_SECRET, HOST="127.0.0.1",
        PORT=str(free_port()), PLANT_STATE_DIR=str(tmp_path / "state"), PLANT_GUARDS="auth",
        REDIS_URL=f"unix://{tmp_path}/redis.sock", REDIS_CLUSTER="true",
        ADMIN_PORT=str(free_port()),
    )
    done = run(["serve"], env, tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    records = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()]
    errors = [r["message"] for r in records if r["severity"] == "ERROR"]
    assert any(m.startswith("config error: REDIS_CLUSTER:") for m in errors), errors
    assert not any("Traceback" in json.dumps(r) for r in records)


def test_serve_on_a_taken_port_is_one_error_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = clean_env(
            PLANT_BACKEND_URL="http://127.0.0.1:9", JWT_SECRET=JWT_SECRET, HOST="127.0.0.1",
            PORT=str(port), PLANT_STATE_DIR=str(tmp_path / "state"), PLANT_GUARDS="auth",
            LOG_LEVEL="WARNING",
        )
        done = run(["serve"], env, tmp_path)
    records = [json.loads(line) for line in (done.stdout + done.stderr).splitlines()]
    assert done.returncode == 1
    assert [r["message"] for r in records if r["severity"] == "ERROR"] == [
        f"PORT: cannot listen on 127.0.0.1:{port}: address already in use"
    ]


def test_db_downgrade_without_yes_keeps_the_audit_table(postgres_dsn: str, tmp_path: Path) -> None:
    dsn = create_database(postgres_dsn, prefix="pgw_cli_down")
    try:
        migrations.upgrade(dsn)
        refused = run(["db", "downgrade", "--database-url", dsn], clean_env(), tmp_path)
        assert refused.returncode == 2
        assert migrations.current(dsn) == "0003"  # unchanged: the newest revision
        done = run(["db", "downgrade", "--yes", "--database-url", dsn], clean_env(), tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "database at revision base"
        assert migrations.current(dsn) is None
    finally:
        drop_database(dsn)


async def test_audit_query_prints_a_header_and_a_dash_for_null(
    databases: dict[str, str], tmp_path: Path
) -> None:
    dsn = databases["migrated_db"]
    customer = f"cust-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn, server_settings={"app.service_account": "gateway"})
    try:
        await conn.execute("SET ROLE plant_audit_writer")
        await conn.execute(
            "INSERT INTO gateway_audit_logs (id, correlation_id, \"timestamp\", gateway_type, "
            "status_code, total_latency_ms, instance_id, seq, prev_hash, row_hash, user_id, "
            "customer_id) VALUES (gen_random_uuid(), gen_random_uuid(), now(), 'PLANT', 401, 1, "
            "'cli-test', 1, repeat('0', 64), repeat('0', 64), NULL, $1)", customer,
        )
    finally:
        await conn.close()
    args = ["audit", "query", "--as-admin", "--customer", customer, "--database-url", dsn]
    done = run(args, clean_env(), tmp_path)
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.strip().splitlines()
    assert header.split() == ["timestamp", "correlation_id", "http_method", "endpoint",
                              "status_code", "user_id", "customer_id", "error_type",
                              "total_latency_ms"]
    assert "None" not in row
    assert row.split()[-5:] == ["401", "-", customer, "-", "1.0"]


def test_verify_counts_a_skipped_check_as_skipped(tmp_path: Path) -> None:
    done = run(["verify", "--url", f"http://127.0.0.1:{free_port()}"], clean_env(), tmp_path)
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert any(" SKIP " in line for line in lines)
    assert lines[-1] == "0 passed, 1 skipped, 4 failed"
