"""``plant-gateway token revoke`` / ``invalidate-user`` against real Redis.

The keys written are the backend's own names, with TTLs that end with the token.
"""

from __future__ import annotations

import time

import jwt
import redis
from typer.testing import CliRunner

from plant_gateway.cli import app


def env_for(redis_url: str, prefix: str) -> dict[str, str]:
    return {
        "PLANT_BACKEND_URL": "http://127.0.0.1:9",
        "JWT_SECRET": "x" * 40,
        "REDIS_URL": redis_url,
        "REVOKED_PREFIX": f"{prefix}revoked_access:",
        "TOKEN_VERSION_PREFIX": f"{prefix}token_version:",
    }


def test_revoke_by_token_and_jti_and_invalidate_user(redis_url: str, redis_prefix: str) -> None:
    runner = CliRunner()
    env = env_for(redis_url, redis_prefix)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    token = jwt.encode({"jti": "abc", "exp": int(time.time()) + 600}, "k" * 40, algorithm="HS256")
    result = runner.invoke(app, ["token", "revoke", "--token", token], env=env)
    assert result.exit_code == 0, result.output
    key = f"{redis_prefix}revoked_access:abc"
    assert client.exists(key) and 600 <= client.ttl(key) <= 670  # exp + leeway (60 s)

    result = runner.invoke(app, ["token", "revoke", "--jti", "j2", "--ttl", "30"], env=env)
    assert result.exit_code == 0, result.output
    assert 0 < client.ttl(f"{redis_prefix}revoked_access:j2") <= 30

    no_jti = jwt.encode({"exp": int(time.time()) + 60}, "k" * 40, algorithm="HS256")
    assert runner.invoke(app, ["token", "revoke", "--token", no_jti], env=env).exit_code == 0
    assert len(client.keys(f"{redis_prefix}revoked_access:*")) == 3  # digest-keyed entry

    for expected in ("1", "2"):
        result = runner.invoke(app, ["token", "invalidate-user", "u-7"], env=env)
        assert result.exit_code == 0, result.output
        assert client.get(f"{redis_prefix}token_version:u-7") == expected
    client.close()


def test_revoke_needs_exactly_one_target_and_redis(redis_url: str, redis_prefix: str) -> None:
    runner = CliRunner()
    env = env_for(redis_url, redis_prefix)
    assert runner.invoke(app, ["token", "revoke"], env=env).exit_code != 0
    both = ["token", "revoke", "--jti", "a", "--token", "b"]
    assert runner.invoke(app, both, env=env).exit_code != 0
    env["REDIS_URL"] = ""
    result = runner.invoke(app, ["token", "revoke", "--jti", "a"], env=env)
    assert result.exit_code == 2
