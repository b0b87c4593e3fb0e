"""``plant-gateway token``: mint a development token, revoke one access token, or invalidate
every session of a user.

Writes the same keys the backend writes (``revoked_access:<jti>``, ``token_version:<user_id>``).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from plant_gateway.cli.common import config_fail, fail, redact_url, sub_app, usage_fail
from plant_gateway.settings import Settings, SettingsError, load_settings

token_app = sub_app(
    "Access tokens: mint a development token, revoke one, invalidate a user's sessions."
)


class SigningAlgorithm(StrEnum):
    """What ``--private-key`` can sign with."""

    RS256 = "RS256"
    RS384 = "RS384"
    RS512 = "RS512"
    ES256 = "ES256"
    ES384 = "ES384"

MIN_SECRET_CHARS = 32  # the gateway refuses a shorter JWT_SECRET (settings)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        config_fail(str(exc))


def _counters(settings: Settings) -> Any:
    if not settings.effective_redis_url:
        config_fail(
            "REDIS_URL: not set; revocations live in the gateway's shared Redis, without it "
            "they would only exist in this CLI process"
        )
    from plant_gateway.counters import create

    return create(settings)


def revocation_target(token: str, max_lifetime_s: int, leeway_s: int) -> tuple[str, int]:
    """(jti or sha256 digest of the token, seconds until it expires) — signature not checked:
    revoking a token never grants anything."""
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise typer.BadParameter(f"not a JWT: {exc}") from None
    jti = claims.get("jti")
    key = str(jti) if jti else hashlib.sha256(token.encode()).hexdigest()
    exp = claims.get("exp")
    ttl = int(exp - time.time()) + leeway_s if isinstance(exp, int | float) else max_lifetime_s
    return key, ttl


@token_app.command("revoke")
def revoke(
    jti: Annotated[str | None, typer.Option("--jti", help="the token's jti claim")] = None,
    token: Annotated[str | None, typer.Option("--token", help="the whole access token")] = None,
    ttl: Annotated[
        int | None,
        typer.Option("--ttl", min=1, help="seconds to keep the entry (default: until exp)"),
    ] = None,
) -> None:
    """Revoke one access token until it expires."""
    if (jti is None) == (token is None):
        raise typer.BadParameter("give exactly one of --jti or --token")
    settings = _settings()
    if token is not None:
        lifetime, leeway = settings.jwt_max_lifetime_s, settings.jwt_leeway_s
        key, until_exp = revocation_target(token, lifetime, leeway)
        if until_exp <= 0:
            typer.echo(f"token {key} has already expired; nothing to revoke")
            return
    else:
        key, until_exp = str(jti), settings.jwt_max_lifetime_s + settings.jwt_leeway_s
    seconds = ttl if ttl is not None else until_exp
    asyncio.run(_run(settings, lambda c: c.revoke(key, seconds)))
    typer.echo(f"revoked {settings.revoked_prefix}{key} for {seconds} s")


@token_app.command("invalidate-user")
def invalidate_user(user_id: Annotated[str, typer.Argument(help="the user_id claim")]) -> None:
    """Refuse every token of USER_ID issued before now (bumps token_version)."""
    settings = _settings()
    version = asyncio.run(_run(settings, lambda c: c.bump_token_version(user_id)))
    typer.echo(f"{settings.token_version_prefix}{user_id} is now {version}")


async def _run(settings: Settings, action: Any) -> Any:
    from plant_gateway.backends.base import DependencyError

    counters = _counters(settings)
    try:
        return await action(counters)
    except DependencyError as exc:
        url = redact_url(settings.effective_redis_url or "")
        fail(f"Redis at {url} (REDIS_URL) does not answer: {exc}")
    finally:
        await counters.close()


def _claim_value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def mint_claims(
    sub: str, user_id: str | None, email: str, roles: str, customer_id: str | None,
    trial: bool, ttl: int, issuer: str, extra: list[str],
) -> dict[str, Any]:
    """The claims of a dev token: required ones filled in, ``k=v`` extras (JSON values) last."""
    import uuid
    from datetime import UTC, datetime, timedelta

    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub, "user_id": user_id or str(uuid.uuid5(uuid.NAMESPACE_URL, sub)),
        "email": email, "roles": [r.strip() for r in roles.split(",") if r.strip()],
        "iss": issuer, "iat": now, "exp": now + ttl, "token_type": "access",
        "jti": uuid.uuid4().hex,
    }
    if customer_id:
        claims["customer_id"] = customer_id
    if trial:
        claims["trial_mode"] = True
        claims["trial_expires_at"] = (datetime.now(UTC) + timedelta(days=14)).isoformat()
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--claim expects key=value, got {item!r}")
        claims[key] = _claim_value(value)
    return claims


@token_app.command("mint")
def mint(
    sub: Annotated[str, typer.Option("--sub")] = "dev-user",
    user_id: Annotated[str | None, typer.Option("--user-id")] = None,
    email: Annotated[str, typer.Option("--email")] = "dev@waooaw.com",
    roles: Annotated[str, typer.Option("--roles", help="comma-separated")] = "admin",
    customer_id: Annotated[str | None, typer.Option("--customer-id")] = None,
    trial: Annotated[bool, typer.Option("--trial", help="trial_mode with a 14-day expiry")] = False,
    ttl: Annotated[int, typer.Option(
        "--ttl", min=1, help="lifetime in seconds (the gateway refuses more than "
        "JWT_MAX_LIFETIME_S, 86400 by default)")] = 3600,
    issuer: Annotated[str, typer.Option("--issuer")] = "waooaw.com",
    claim: Annotated[list[str] | None, typer.Option(
        "--claim", metavar="K=V", help="extra claim (V parsed as JSON when it is)")] = None,
    private_key: Annotated[Path | None, typer.Option(
        "--private-key", metavar="FILE", exists=True, dir_okay=False, readable=True,
        help="PEM private key: sign RS256/ES256 instead of HS256")] = None,
    alg: Annotated[SigningAlgorithm | None, typer.Option(
        "--alg", help="with --private-key (default: RS256, or ES256 for an EC key)")] = None,
    kid: Annotated[str | None, typer.Option("--kid")] = None,
    secret: Annotated[str | None, typer.Option(
        "--secret", envvar="JWT_SECRET", show_envvar=True,
        help=f"HS256 secret, at least {MIN_SECRET_CHARS} characters")] = None,
) -> None:
    """Print a development access token signed with JWT_SECRET (or --private-key)."""
    claims = mint_claims(sub, user_id, email, roles, customer_id, trial, ttl, issuer, claim or [])
    headers = {"kid": kid} if kid else None
    if private_key is not None:
        typer.echo(_sign_with_key(claims, private_key, alg and alg.value, headers))
        return
    if alg is not None:
        usage_fail("--alg needs --private-key (without it the token is HS256)")
    if not secret:
        config_fail("JWT_SECRET: not set (or pass --secret, or --private-key)")
    if len(secret) < MIN_SECRET_CHARS:
        config_fail(
            f"JWT_SECRET: the secret (--secret) must be at least {MIN_SECRET_CHARS} characters "
            "long, as the gateway requires"
        )
    import jwt

    typer.echo(jwt.encode(claims, secret, algorithm="HS256", headers=headers))


def _sign_with_key(
    claims: dict[str, Any], path: Path, alg: str | None, headers: dict[str, Any] | None
) -> str:
    """The token signed with the PEM private key in ``path``; a one-line error otherwise."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        usage_fail(f"--private-key: cannot read {str(path)!r}: {exc.strerror}")
    except (ValueError, TypeError) as exc:
        reason = str(exc).split(". ")[0]
        usage_fail(f"--private-key: {str(path)!r} is not an unencrypted PEM private key: {reason}")
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        usage_fail(f"--private-key: {str(path)!r} is neither an RSA nor an EC key")
    kind, family = ("RSA", "RS") if isinstance(key, rsa.RSAPrivateKey) else ("EC", "ES")
    algorithm = alg or f"{family}256"
    if not algorithm.startswith(family):
        usage_fail(f"--alg {algorithm} does not fit the {kind} key in {str(path)!r} "
                   f"(use {family}256)")
    try:
        return jwt.encode(claims, key, algorithm=algorithm, headers=headers)
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        usage_fail(f"--private-key: cannot sign {algorithm} with {str(path)!r}: {exc}")


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
