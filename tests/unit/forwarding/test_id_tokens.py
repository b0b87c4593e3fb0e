"""Backend ID tokens (plant_gateway.forwarding.id_tokens): fetched once, reused until expiry.

The metadata server is a fake session; the token's ``exp`` claim decides when it is refetched.
"""

from __future__ import annotations

import base64
import json
import time
from types import TracebackType
from typing import Any

import aiohttp

from plant_gateway.forwarding.id_tokens import METADATA_URL, IdTokenSource, _jwt_exp


def jwt(exp: float) -> str:
    body = base64.urlsafe_b64encode(json.dumps({"exp": exp}).encode()).rstrip(b"=").decode()
    return f"header.{body}.signature"


class FakeResponse:
    def __init__(self, token: str) -> None:
        self.token = token

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    def raise_for_status(self) -> None:
        return None

    async def text(self) -> str:
        return self.token + "\n"


class FakeSession:
    """Answers the metadata server's identity URL with the next of ``tokens``."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def get(self, url: str, **kwargs: Any) -> FakeResponse:
        self.calls.append((url, kwargs))
        return FakeResponse(self.tokens.pop(0))


def test_expiry_from_the_exp_claim_or_five_minutes() -> None:
    assert _jwt_exp(jwt(1_900_000_000)) == 1_900_000_000
    assert abs(_jwt_exp("not-a-jwt") - (time.time() + 300)) < 5


async def test_token_is_cached_until_a_minute_before_it_expires() -> None:
    fresh, soon, next_one = jwt(time.time() + 3600), jwt(time.time() + 30), jwt(time.time() + 3600)
    session = FakeSession(fresh, soon, next_one)
    source = IdTokenSource("https://backend.run.app")
    fake: Any = session  # stands in for an aiohttp.ClientSession
    assert await source.get(fake) == fresh
    assert await source.get(fake) == fresh and len(session.calls) == 1
    url, kwargs = session.calls[0]
    assert url == METADATA_URL and kwargs["params"] == {"audience": "https://backend.run.app"}
    assert kwargs["headers"] == {"Metadata-Flavor": "Google"}
    assert isinstance(kwargs["timeout"], aiohttp.ClientTimeout)
    source.expires = 0.0  # expired: the next call fetches again
    assert await source.get(fake) == soon
    assert await source.get(fake) == next_one  # within a minute of its expiry: refetched
