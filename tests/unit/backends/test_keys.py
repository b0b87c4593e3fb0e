"""PEM and shared-secret key sources: RS256/ES256, algorithm confusion, bad configuration.

Each configured key verifies only the algorithms its type allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from plant_gateway.backends.keys import CompositeKeySource, StaticKeySource, create
from plant_gateway.counters import create as create_counters
from plant_gateway.guards.auth import AuthConfig, AuthStep
from plant_gateway.settings import SettingsError
from tests.unit.auth_support import (
    SECRET,
    claims,
    context,
    ec_key,
    forge_hs256,
    mint,
    private_pem,
    public_pem,
    rsa_key,
    settings,
)

RSA = rsa_key()
EC = ec_key()


def step_for(**overrides: Any) -> AuthStep:
    overrides.setdefault("jwt_secret", None)
    cfg = settings(**overrides)
    return AuthStep(AuthConfig.from_settings(cfg), create(cfg), create_counters(cfg))


async def outcome(step: AuthStep, token: str) -> str:
    problem = await step.run(context(token))
    return "ok" if problem is None else problem.kind


async def test_rs256_with_inline_pem() -> None:
    step = step_for(jwt_public_key=public_pem(RSA))
    assert await outcome(step, mint(RSA, "RS256")) == "ok"
    assert await outcome(step, mint(rsa_key(), "RS256")) == "invalid-token"


async def test_es256_with_pem_file_path(tmp_path: Path) -> None:
    path = tmp_path / "jwt.pub.pem"
    path.write_text(public_pem(EC))
    step = step_for(jwt_public_key=str(path))
    assert await outcome(step, mint(EC, "ES256")) == "ok"
    assert await outcome(step, mint(ec_key(), "ES256")) == "invalid-token"


async def test_pem_with_escaped_newlines_from_an_env_var() -> None:
    step = step_for(jwt_public_key=public_pem(RSA).replace("\n", "\\n"))
    assert await outcome(step, mint(RSA, "RS256")) == "ok"


async def test_hs256_signed_with_the_rsa_public_key_is_rejected() -> None:
    """Algorithm confusion: the public PEM used as an HMAC secret must never verify."""
    pem = public_pem(RSA)
    step = step_for(jwt_public_key=pem)
    for secret in (pem.encode(), pem.strip().encode()):
        assert await outcome(step, forge_hs256(secret, claims())) == "invalid-token"


async def test_confusion_rejected_when_secret_and_public_key_are_both_configured() -> None:
    pem = public_pem(RSA)
    step = step_for(jwt_public_key=pem, jwt_secret=SECRET)
    assert isinstance(step.keys, CompositeKeySource)
    assert await outcome(step, forge_hs256(pem.encode(), claims())) == "invalid-token"
    assert await outcome(step, mint(SECRET, "HS256")) == "ok"
    assert await outcome(step, mint(RSA, "RS256")) == "ok"


async def test_rs256_token_against_an_ec_key_is_rejected() -> None:
    step = step_for(jwt_public_key=public_pem(EC))
    assert await outcome(step, mint(RSA, "RS256")) == "invalid-token"


async def test_pem_key_honours_the_algorithm_allow_list() -> None:
    step = step_for(jwt_public_key=public_pem(RSA), jwt_algorithms=["RS256"])
    assert await outcome(step, mint(RSA, "RS512")) == "invalid-token"
    assert await outcome(step, mint(RSA, "RS256")) == "ok"


async def test_es256_token_is_refused_when_only_the_secret_is_configured() -> None:
    step = step_for(jwt_secret=SECRET)
    assert await outcome(step, mint(EC, "ES256")) == "invalid-token"


def test_secret_source_is_bound_to_hmac_algorithms() -> None:
    source = create(settings())
    assert isinstance(source, StaticKeySource)
    assert source.algorithms == {"HS256"}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/no/such/file.pem", "neither inline PEM"),
        ("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----", "not a valid PEM"),
    ],
)
def test_bad_public_key_stops_start_up_naming_the_setting(value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=f"JWT_PUBLIC_KEY: {message}"):
        create(settings(jwt_secret=None, jwt_public_key=value))


def test_private_key_is_refused_as_public_key() -> None:
    with pytest.raises(SettingsError, match="JWT_PUBLIC_KEY: expected a public key"):
        create(settings(jwt_secret=None, jwt_public_key=private_pem(RSA)))


def test_key_type_outside_allow_list_stops_start_up() -> None:
    with pytest.raises(SettingsError, match="JWT_PUBLIC_KEY"):
        create(settings(jwt_secret=None, jwt_public_key=public_pem(RSA), jwt_algorithms=["ES256"]))


async def test_key_source_reports_ready_without_secrets() -> None:
    status = await create(settings()).check()
    assert status.ok and SECRET not in status.detail


# The deployed Terraform sets JWT_PUBLIC_KEY from the same Secret Manager secret as JWT_SECRET
# (HS256). Such a value is a shared secret: used for HS tokens only, announced once.
DEPLOYED_SECRET = "s" * 40


async def test_hs_secret_in_public_key_setting_verifies_hs_tokens_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="plant_gateway.backends.keys"):
        step = step_for(jwt_public_key=DEPLOYED_SECRET, jwt_algorithms=["HS256"])
    assert await outcome(step, mint(DEPLOYED_SECRET, "HS256")) == "ok"
    assert await outcome(step, mint("x" * 40, "HS256")) == "invalid-token"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "HS shared secret" in warnings[0]
    assert DEPLOYED_SECRET not in warnings[0]


async def test_hs_secret_in_public_key_never_verifies_an_rs_token() -> None:
    step = step_for(jwt_public_key=DEPLOYED_SECRET)
    assert await outcome(step, mint(RSA, "RS256")) == "invalid-token"


async def test_same_secret_in_both_settings_is_one_key(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="plant_gateway.backends.keys"):
        step = step_for(jwt_secret=DEPLOYED_SECRET, jwt_public_key=DEPLOYED_SECRET)
    assert isinstance(step.keys, StaticKeySource)
    assert await outcome(step, mint(DEPLOYED_SECRET, "HS256")) == "ok"
    assert ["the same HS secret" in r.getMessage() for r in caplog.records] == [True]


@pytest.mark.parametrize(
    "value",
    ["too-short-a-secret", "/run/secrets/jwt-public-key-that-is-not-there", "jwt-public-key.pem"],
)
def test_short_secret_or_missing_file_stops_start_up(value: str) -> None:
    with pytest.raises(SettingsError, match="JWT_PUBLIC_KEY: neither inline PEM"):
        create(settings(jwt_secret=None, jwt_public_key=value))


def test_secret_in_public_key_needs_an_hs_algorithm() -> None:
    with pytest.raises(SettingsError, match="JWT_PUBLIC_KEY"):
        create(settings(jwt_secret=None, jwt_public_key=DEPLOYED_SECRET, jwt_algorithms=["RS256"]))
