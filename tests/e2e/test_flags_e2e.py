"""Feature flags end to end: a real gateway reads a flags file and switches a guard per user.

``enable_rate_limiting`` off for one user only, then (file reload) for a second one too.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.fixtures.processes import Proc

TIERS = {name: {"limit": 3, "period_s": 3600, "burst": 0}
         for name in ("trial", "paid", "governor", "enterprise", "anonymous")}


def rate_flag(users: list[str]) -> dict[str, Any]:
    return {"flags": {"enable_rate_limiting": {
        "key": "enable_rate_limiting", "on": True, "variations": [True, False],
        "offVariation": 0, "fallthrough": {"variation": 0},
        "targets": [{"values": users, "variation": 1}],
    }}}


def write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    later = time.time() + 2
    os.utime(path, (later, later))


def status(url: str, token: str) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_rate_limiting_flag_per_user_and_reload(
    backend: Proc, gateway_factory: Callable[..., Proc], mint: Callable[..., str],
    tmp_path: Path,
) -> None:
    exempt, limited = str(uuid.uuid4()), str(uuid.uuid4())
    flags_file = tmp_path / "flags.json"
    write(flags_file, rate_flag([exempt]))
    gw = gateway_factory({
        "FLAGS_FILE": str(flags_file),
        "RATE_TIERS": json.dumps(TIERS),
        "PLANT_GUARDS": "auth,rate_limit",
    }, backend=backend)
    url = gw.url + "/api/v1/agents"
    exempt_token = mint(user_id=exempt, roles=["admin"])
    limited_token = mint(user_id=limited, roles=["admin"])

    assert [status(url, exempt_token) for _ in range(6)] == [200] * 6, gw.output()[-2000:]
    limited_codes = [status(url, limited_token) for _ in range(6)]
    assert limited_codes[0] == 200 and limited_codes[-1] == 429, limited_codes

    write(flags_file, rate_flag([exempt, limited]))  # reloaded without a restart
    deadline = time.monotonic() + 15
    while status(url, limited_token) != 200:
        assert time.monotonic() < deadline, "flags file change not picked up"
        time.sleep(0.2)
    assert [status(url, limited_token) for _ in range(4)] == [200] * 4
