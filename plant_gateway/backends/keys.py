"""Key sources for JWT verification: HS shared secret, PEM public key, or a JWKS URL.

Each key is bound to the algorithms its type allows, so an HS token can never verify against an
RSA/EC public key (algorithm confusion); a JWKS outage denies, it never skips the check.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from plant_gateway import events
from plant_gateway.backends.base import DependencyError, DependencyStatus
from plant_gateway.settings import Settings, SettingsError

log = logging.getLogger(__name__)

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512"})
EC_ALGORITHMS_BY_CURVE = {"secp256r1": frozenset({"ES256"}), "secp384r1": frozenset({"ES384"})}
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS | frozenset({"ES256", "ES384"})
JWK_CURVES = {"P-256": "secp256r1", "P-384": "secp384r1"}
MAX_JWKS_BYTES = 1024 * 1024


class KeyLookupError(Exception):
    """The token names a key or algorithm this gateway does not trust: the token is invalid."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key and the only algorithms a token may use with it."""

    key: Any
    algorithms: tuple[str, ...]
    kid: str | None = None


def algorithms_for_public_key(key: Any) -> frozenset[str]:
    """The signature algorithms a public key's type allows (empty for unsupported types)."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return EC_ALGORITHMS_BY_CURVE.get(key.curve.name, frozenset())
    return frozenset()


class KeySource(ABC):
    """Finds the verification key for a token header. A ``Dependency`` for ``/ready``."""

    name = "jwt_keys"

    @property
    @abstractmethod
    def algorithms(self) -> frozenset[str]:
        """Every algorithm some key of this source can verify."""

    @property
    def generation(self) -> int:
        """Bumped whenever a key is withdrawn, so cached verifications are redone."""
        return 0

    @abstractmethod
    async def key_for(self, header: Mapping[str, Any]) -> VerificationKey:
        """Key for this token header; ``KeyLookupError`` (401) or ``DependencyError`` (503)."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def check(self) -> DependencyStatus:
        return DependencyStatus(self.name, True, detail=type(self).__name__)

    def _require_alg(self, header: Mapping[str, Any]) -> str:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise KeyLookupError(f"algorithm {str(alg)[:16]!r} is not accepted")
        return alg


class StaticKeySource(KeySource):
    """A single configured key (shared secret or PEM public key); ``kid`` is ignored."""

    def __init__(self, key: VerificationKey, label: str) -> None:
        self._key = key
        self._label = label
        self._algorithms = frozenset(key.algorithms)

    @property
    def algorithms(self) -> frozenset[str]:
        return self._algorithms

    async def key_for(self, header: Mapping[str, Any]) -> VerificationKey:
        self._require_alg(header)
        return self._key

    async def check(self) -> DependencyStatus:
        return DependencyStatus(self.name, True, detail=self._label)


def secret_source(secret: str, allowed: Iterable[str]) -> StaticKeySource | None:
    algorithms = tuple(sorted(HMAC_ALGORITHMS.intersection(allowed)))
    if not algorithms:
        return None
    return StaticKeySource(VerificationKey(secret.encode(), algorithms), "shared secret")


def load_public_key(value: str) -> Any:
    """A public key from inline PEM (``\\n`` escapes allowed) or a path to a PEM file."""
    text = value.strip()
    if "-----BEGIN" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise SettingsError("JWT_PUBLIC_KEY: neither inline PEM nor a readable file path")
        text = path.read_text()
    text = text.replace("\\n", "\n")
    if "PRIVATE KEY" in text:
        raise SettingsError("JWT_PUBLIC_KEY: expected a public key, got a private key")
    try:
        if "BEGIN CERTIFICATE" in text:
            return load_pem_x509_certificate(text.encode()).public_key()
        return load_pem_public_key(text.encode())
    except ValueError:
        raise SettingsError("JWT_PUBLIC_KEY: not a valid PEM public key") from None


def pem_source(value: str, allowed: Iterable[str]) -> StaticKeySource | None:
    key = load_public_key(value)
    kinds = algorithms_for_public_key(key)
    if not kinds:
        raise SettingsError("JWT_PUBLIC_KEY: only RSA and EC P-256/P-384 keys are supported")
    algorithms = tuple(sorted(kinds.intersection(allowed)))
    if not algorithms:
        return None
    label = "RSA public key" if isinstance(key, rsa.RSAPublicKey) else "EC public key"
    return StaticKeySource(VerificationKey(key, algorithms), label)


MIN_HS_SECRET_CHARS = 32


def looks_like_pem_or_path(value: str) -> bool:
    """PEM text or a file name: never read as a secret, so a mistyped path fails loudly."""
    text = value.strip()
    return (
        "-----BEGIN" in text
        or text.startswith(("/", "~", "./", "../"))
        or text.endswith((".pem", ".crt", ".pub", ".key"))
        or Path(text).expanduser().is_file()
    )


def public_key_setting_source(settings: Settings, allowed: frozenset[str]) -> KeySource | None:
    """The key ``JWT_PUBLIC_KEY`` names: a PEM key, or (deployed-stack compatibility) an HS secret.

    The deployed Terraform sets ``JWT_PUBLIC_KEY`` from the same secret as ``JWT_SECRET`` for
    HS256. A value that is neither PEM nor a file path is therefore taken as a shared secret,
    bound to the HS algorithms only (so it can never verify an RS/ES token), held to the same
    length rule as ``JWT_SECRET``, and announced once at start-up as a warning.
    """
    value = settings.jwt_public_key or ""
    if looks_like_pem_or_path(value):
        pem = pem_source(value, allowed)
        if pem is None:
            raise SettingsError("JWT_PUBLIC_KEY: the key type fits none of JWT_ALGORITHMS")
        return pem
    secret = value.strip()
    if not HMAC_ALGORITHMS & allowed:
        raise SettingsError("JWT_PUBLIC_KEY: neither inline PEM nor a readable file path")
    if len(secret) < MIN_HS_SECRET_CHARS:
        raise SettingsError(
            "JWT_PUBLIC_KEY: neither inline PEM, a readable file path nor an HS secret of at "
            f"least {MIN_HS_SECRET_CHARS} characters"
        )
    if settings.jwt_secret is not None:
        # as on the deployed gateway, JWT_SECRET wins; the usual case is the same secret twice
        same = settings.jwt_secret.get_secret_value() == secret
        log.warning(
            "JWT_PUBLIC_KEY holds no public key but %s HS secret; JWT_SECRET is used",
            "the same" if same else "another",
        )
        return None
    log.warning("JWT_PUBLIC_KEY holds no public key: it is used as an HS shared secret")
    return secret_source(secret, allowed)


def parse_jwk(jwk: Mapping[str, Any], allowed: frozenset[str]) -> VerificationKey | None:
    """A JWKS entry as a bound key, or ``None`` when it is not a usable signing key."""
    kid, kty = jwk.get("kid"), jwk.get("kty")
    if not isinstance(kid, str) or not kid or jwk.get("use", "sig") != "sig":
        return None
    if kty == "RSA":
        family = RSA_ALGORITHMS
    elif kty == "EC":
        family = EC_ALGORITHMS_BY_CURVE.get(JWK_CURVES.get(str(jwk.get("crv")), ""), frozenset())
    else:
        return None  # symmetric ("oct") keys are never taken from a URL
    declared = jwk.get("alg")
    algorithms = family & allowed if declared is None else family & allowed & {declared}
    if not algorithms:
        return None
    try:
        key = PyJWK(dict(jwk), algorithm=min(algorithms)).key
    except (PyJWKError, ValueError, TypeError):
        return None
    return VerificationKey(key, tuple(sorted(algorithms)), kid)


class JwksKeySource(KeySource):
    """Keys from a JWKS URL, cached by ``kid``, refreshed in the background.

    An unknown ``kid`` triggers at most one fetch in flight and at most one per
    ``min_refetch_s``; keys older than ``max_stale_s`` without a successful fetch stop
    verifying (503), and a set that never loaded denies every token.
    """

    def __init__(
        self,
        url: str,
        allowed: Iterable[str],
        *,
        refresh_s: float,
        min_refetch_s: float,
        max_stale_s: float,
        timeout_s: float,
    ) -> None:
        self._url = url
        self._allowed = frozenset(allowed) & ASYMMETRIC_ALGORITHMS
        self._refresh_s = refresh_s
        self._min_refetch_s = min_refetch_s
        self._max_stale_s = max_stale_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._keys: dict[str, VerificationKey] = {}
        self._loaded_at: float | None = None
        self._last_attempt = -math.inf
        self._inflight: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._generation = 0
        self.fetch_count = 0
        self.last_error = ""

    @property
    def algorithms(self) -> frozenset[str]:
        return self._allowed

    @property
    def generation(self) -> int:
        return self._generation

    def is_fresh(self) -> bool:
        loaded = self._loaded_at
        return loaded is not None and time.monotonic() - loaded <= self._max_stale_s

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        await self._fetch_shared()
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_loop(), name="jwks-refresh")

    async def close(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._refresher = self._inflight = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self) -> DependencyStatus:
        if self.is_fresh():
            return DependencyStatus(self.name, True, detail=f"jwks: {len(self._keys)} keys")
        reason = self.last_error or "not loaded"
        return DependencyStatus(self.name, False, detail=f"jwks unavailable: {reason}")

    async def key_for(self, header: Mapping[str, Any]) -> VerificationKey:
        alg = self._require_alg(header)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise KeyLookupError("token has no kid")
        key = self._keys.get(kid) if self.is_fresh() else None
        if key is None:
            await self._refetch_rate_limited()
            if not self.is_fresh():
                raise DependencyError("signing keys unavailable")
            key = self._keys.get(kid)
            if key is None:
                raise KeyLookupError("unknown kid")
        if alg not in key.algorithms:
            raise KeyLookupError(f"algorithm {alg} does not match the key")
        return key

    async def _refetch_rate_limited(self) -> None:
        inflight = self._inflight
        if inflight is None and time.monotonic() - self._last_attempt < self._min_refetch_s:
            return
        await self._fetch_shared()

    async def _fetch_shared(self) -> bool:
        """Join the fetch in flight or start one; a cancelled waiter never cancels the fetch."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._fetch(), name="jwks-fetch")
            self._inflight.add_done_callback(self._clear_inflight)
        return await asyncio.shield(self._inflight)

    def _clear_inflight(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self._fetch_shared()

    async def _fetch(self) -> bool:
        self._last_attempt = time.monotonic()
        self.fetch_count += 1
        try:
            document = await self._download()
            keys = self._parse(document)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old keys, never opens
            self.last_error = exc.args[0] if isinstance(exc, _JwksError) else type(exc).__name__
            events.dependency("jwks").down(f"fetch failed: {self.last_error}")
            return False
        self._install(keys)
        events.dependency("jwks").up()
        return True

    async def _download(self) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.get(self._url, allow_redirects=False) as response:
            if response.status != 200:
                raise _JwksError(f"HTTP {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                body.extend(chunk)
                if len(body) > MAX_JWKS_BYTES:
                    raise _JwksError("document too large")
        try:
            return json.loads(body)
        except ValueError:
            raise _JwksError("not JSON") from None

    def _parse(self, document: Any) -> dict[str, VerificationKey]:
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise _JwksError("no keys array")
        keys: dict[str, VerificationKey] = {}
        for entry in entries:
            key = parse_jwk(entry, self._allowed) if isinstance(entry, dict) else None
            if key is not None and key.kid is not None:
                keys[key.kid] = key
        return keys

    def _install(self, keys: dict[str, VerificationKey]) -> None:
        withdrawn = [kid for kid, old in self._keys.items() if keys.get(kid) != old]
        if withdrawn:
            self._generation += 1
        self._keys = keys
        self._loaded_at = time.monotonic()
        self.last_error = ""


class _JwksError(Exception):
    """A JWKS response that cannot be used; its message is safe for ``/ready``."""


class CompositeKeySource(KeySource):
    """Several configured sources; a token goes to the one whose key type fits its ``alg``."""

    def __init__(self, sources: list[KeySource]) -> None:
        self.sources = sources
        self._algorithms: frozenset[str] = frozenset().union(*(s.algorithms for s in sources))

    @property
    def algorithms(self) -> frozenset[str]:
        return self._algorithms

    @property
    def generation(self) -> int:
        return sum(source.generation for source in self.sources)

    async def key_for(self, header: Mapping[str, Any]) -> VerificationKey:
        alg = self._require_alg(header)
        candidates = [s for s in self.sources if alg in s.algorithms]
        if len(candidates) > 1 and header.get("kid"):
            candidates.sort(key=lambda s: not isinstance(s, JwksKeySource))
        return await candidates[0].key_for(header)

    async def start(self) -> None:
        await asyncio.gather(*(source.start() for source in self.sources))

    async def close(self) -> None:
        await asyncio.gather(*(source.close() for source in self.sources))

    async def check(self) -> DependencyStatus:
        statuses = [await source.check() for source in self.sources]
        ok = all(status.ok for status in statuses)
        return DependencyStatus(self.name, ok, detail="; ".join(s.detail for s in statuses))


def create(settings: Settings) -> KeySource:
    """The key source(s) configured in settings; ``SettingsError`` when none is usable."""
    allowed = frozenset(settings.jwt_algorithms)
    sources: list[KeySource] = []
    if settings.jwt_secret is not None:
        source = secret_source(settings.jwt_secret.get_secret_value(), allowed)
        if source is not None:
            sources.append(source)
    if settings.jwt_public_key:
        from_public_key = public_key_setting_source(settings, allowed)
        if from_public_key is not None:
            sources.append(from_public_key)
    if settings.jwt_jwks_url:
        if not allowed & ASYMMETRIC_ALGORITHMS:
            raise SettingsError("JWT_JWKS_URL: JWT_ALGORITHMS allows no RS*/ES* algorithm")
        sources.append(
            JwksKeySource(
                settings.jwt_jwks_url,
                allowed,
                refresh_s=settings.jwks_refresh_s,
                min_refetch_s=settings.jwks_min_refetch_s,
                max_stale_s=settings.jwks_max_stale_s,
                timeout_s=settings.jwks_timeout_s,
            )
        )
    if not sources:
        raise SettingsError("JWT_ALGORITHMS: no configured key can verify any allowed algorithm")
    return sources[0] if len(sources) == 1 else CompositeKeySource(sources)
