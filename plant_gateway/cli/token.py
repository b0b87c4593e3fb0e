"""``plant-gateway token``: revoke one access token, or invalidate every session of a user.

Writes the same keys the backend writes (``revoked_access:<jti>``, ``token_version:<user_id>``).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Annotated, Any

import typer

from plant_gateway.settings import Settings, SettingsError, load_settings

token_app = typer.Typer(help="Access tokens: revoke, invalidate sessions.", no_args_is_help=True)


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None


def _counters(settings: Settings) -> Any:
    if not settings.effective_redis_url:
        typer.echo(
            "REDIS_URL is not set: revocations live in the gateway's shared Redis; without it "
            "they would only exist in this CLI process", err=True,
        )
        raise typer.Exit(2)
    from plant_gateway.backends.counters import create

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
        int | None, typer.Option("--ttl", help="seconds to keep the entry (default: until exp)")
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
        typer.echo(f"redis unavailable: {exc}", err=True)
        raise typer.Exit(1) from None
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
    ttl: Annotated[int, typer.Option("--ttl", help="lifetime in seconds")] = 3600,
    issuer: Annotated[str, typer.Option("--issuer")] = "waooaw.com",
    claim: Annotated[list[str] | None, typer.Option("--claim", help="extra claim k=v")] = None,
    private_key: Annotated[
        str | None, typer.Option("--private-key", help="PEM file: sign RS256/ES256 instead")
    ] = None,
    alg: Annotated[str | None, typer.Option("--alg", help="RS256/ES256 (--private-key)")] = None,
    kid: Annotated[str | None, typer.Option("--kid")] = None,
    secret: Annotated[
        str | None, typer.Option("--secret", envvar="JWT_SECRET", help="HS256 secret")
    ] = None,
) -> None:
    """Print a development access token signed with JWT_SECRET (or --private-key)."""
    import jwt

    claims = mint_claims(sub, user_id, email, roles, customer_id, trial, ttl, issuer, claim or [])
    headers = {"kid": kid} if kid else None
    if private_key:
        from pathlib import Path

        pem = Path(private_key).read_text()
        algorithm = alg or ("ES256" if "EC PRIVATE" in pem else "RS256")
        typer.echo(jwt.encode(claims, pem, algorithm=algorithm, headers=headers))
        return
    if not secret:
        typer.echo("config error: JWT_SECRET: set it (or pass --secret / --private-key)", err=True)
        raise typer.Exit(2)
    typer.echo(jwt.encode(claims, secret, algorithm="HS256", headers=headers))


def register(app: typer.Typer) -> None:
    app.add_typer(token_app, name="token")
