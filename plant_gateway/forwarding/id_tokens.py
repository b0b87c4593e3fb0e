"""Google ID tokens for an IAM-protected backend (Cloud Run), from the metadata server.

Cached until shortly before they expire; used by forwarding, auth enrichment and remote policy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import aiohttp

# GCE_METADATA_HOST: the variable Google's client libraries honour (an emulator, or tests)
METADATA_URL = (
    f"http://{os.environ.get('GCE_METADATA_HOST') or 'metadata.google.internal'}"
    "/computeMetadata/v1/instance/service-accounts/default/identity"
)


class IdTokenSource:
    """Google ID tokens from the metadata server for an IAM-protected backend, cached to expiry."""

    def __init__(self, audience: str) -> None:
        self.audience = audience
        self.token: str | None = None
        self.expires = 0.0
        self._lock = asyncio.Lock()

    async def get(self, session: aiohttp.ClientSession) -> str:
        if self.token and time.time() < self.expires - 60:
            return self.token
        async with self._lock:
            if self.token and time.time() < self.expires - 60:
                return self.token
            timeout = aiohttp.ClientTimeout(total=3)
            async with session.get(
                METADATA_URL, params={"audience": self.audience}, timeout=timeout,
                headers={"Metadata-Flavor": "Google"},
            ) as resp:
                resp.raise_for_status()
                token = (await resp.text()).strip()
            self.token, self.expires = token, _jwt_exp(token)
            return token


def _jwt_exp(token: str) -> float:
    try:
        payload = token.split(".")[1]
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(doc["exp"])
    except (IndexError, ValueError, KeyError):
        return time.time() + 300
