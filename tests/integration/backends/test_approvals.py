"""The HTTP approvals backend against a stand-in PP approvals API over real HTTP.

200 is a record, 404 unknown, 401/403 refused (the caller's own token is what is sent), any
other answer, a timeout or a stopped API an outage; positive answers are cached per caller.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from plant_gateway.backends import approvals
from plant_gateway.backends.approvals import HttpApprovals, NotVerified, parse_record
from plant_gateway.backends.base import ApprovalRecord, DependencyError
from plant_gateway.settings import Settings, SettingsError, load_settings
from tests.fixtures.approvals_api import ApprovalsApi
from tests.fixtures.processes import mint_token

ADMIN = "Bearer " + mint_token(roles=["admin"], governor_agent_id=None)
USER = "Bearer " + mint_token(roles=["user"])


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def api() -> AsyncIterator[ApprovalsApi]:
    server = ApprovalsApi()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def backend(api: ApprovalsApi) -> AsyncIterator[HttpApprovals]:
    made = HttpApprovals(api.url, timeout_s=0.5)
    await made.start()
    yield made
    await made.close()


async def test_a_minted_approval_is_a_record_fetched_with_the_callers_token(
    api: ApprovalsApi, backend: HttpApprovals
) -> None:
    doc = api.mint("export_data", agent_id="agent-7", customer_id="cust-7")
    found = await backend.lookup(doc["approval_id"], ADMIN)
    assert isinstance(found, ApprovalRecord)
    assert (found.approval_id, found.action, found.agent_id, found.customer_id) == (
        doc["approval_id"], "export_data", "agent-7", "cust-7")
    assert found.expires_ns is not None
    assert abs(found.expires_ns / 1e9 - (time.time() + 600)) < 60
    assert api.lookups == [(doc["approval_id"], ADMIN)]
    assert found.as_input()["verified"] is True


async def test_positive_answers_are_cached_per_caller(
    api: ApprovalsApi, backend: HttpApprovals
) -> None:
    doc = api.mint("delete_agent")
    for _ in range(3):
        assert isinstance(await backend.lookup(doc["approval_id"], ADMIN), ApprovalRecord)
    assert len(api.lookups) == 1
    other_admin = "Bearer " + mint_token(roles=["admin"], sub="another-admin")
    assert isinstance(await backend.lookup(doc["approval_id"], other_admin), ApprovalRecord)
    assert len(api.lookups) == 2


async def test_a_cached_record_is_asked_again_after_it_expires(api: ApprovalsApi) -> None:
    clock = Clock()
    backend = HttpApprovals(api.url, timeout_s=0.5, clock=clock)
    try:
        doc = api.mint("export_data", expires_in_seconds=60)
        await backend.lookup(doc["approval_id"], ADMIN)
        clock.now += 30
        await backend.lookup(doc["approval_id"], ADMIN)
        assert len(api.lookups) == 1
        clock.now += 31
        await backend.lookup(doc["approval_id"], ADMIN)
        assert len(api.lookups) == 2
        never = api.mint("export_data", expires_in_seconds=None)  # cached 300 s at most
        await backend.lookup(never["approval_id"], ADMIN)
        clock.now += 301
        await backend.lookup(never["approval_id"], ADMIN)
        assert len(api.lookups) == 4
    finally:
        await backend.close()


async def test_unknown_ids_and_refused_tokens_are_not_verified(
    api: ApprovalsApi, backend: HttpApprovals
) -> None:
    assert await backend.lookup("APR-nope", ADMIN) == NotVerified("unknown")
    assert await backend.lookup("APR-nope", ADMIN) == NotVerified("unknown")
    assert len(api.lookups) == 2  # negative answers are not cached
    doc = api.mint("export_data")
    assert await backend.lookup(doc["approval_id"], USER) == NotVerified("refused")  # 403
    assert await backend.lookup(doc["approval_id"], None) == NotVerified("refused")  # 401
    assert api.lookups[-1] == (doc["approval_id"], None)


async def test_ids_are_sent_as_one_path_segment(
    api: ApprovalsApi, backend: HttpApprovals
) -> None:
    api.records["APR-a:b~c.d"] = {**api.mint("export_data"), "approval_id": "APR-a:b~c.d"}
    found = await backend.lookup("APR-a:b~c.d", ADMIN)
    assert isinstance(found, ApprovalRecord) and found.approval_id == "APR-a:b~c.d"


@pytest.mark.parametrize("status", [500, 502, 503, 302, 400])
async def test_other_answers_are_an_outage(
    api: ApprovalsApi, backend: HttpApprovals, status: int
) -> None:
    api.fail_status = status
    with pytest.raises(DependencyError, match=str(status)):
        await backend.lookup("APR-1", ADMIN)


async def test_a_slow_or_stopped_api_is_an_outage(
    api: ApprovalsApi, backend: HttpApprovals
) -> None:
    api.delay_s = 2.0  # the backend waits 0.5 s
    with pytest.raises(DependencyError, match="TimeoutError"):
        await backend.lookup("APR-1", ADMIN)
    await api.stop()
    with pytest.raises(DependencyError, match="approvals API failed"):
        await backend.lookup("APR-1", ADMIN)


async def test_an_answer_for_another_id_is_an_outage(
    api: ApprovalsApi, backend: HttpApprovals
) -> None:
    doc = api.mint("export_data")
    api.records["APR-asked"] = doc  # names another approval_id
    with pytest.raises(DependencyError, match="not the record asked for"):
        await backend.lookup("APR-asked", ADMIN)


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"approval_id": "APR-1"}', b'{"approval_id": "APR-1", "action": 3}',
    b'{"approval_id": "APR-1", "action": "x", "agent_id": 5}',
    b'{"approval_id": "APR-1", "action": "x", "expires_at": "tomorrow"}',
])
def test_a_malformed_record_is_never_a_verification(body: bytes) -> None:
    with pytest.raises(DependencyError):
        parse_record(body, "APR-1")


@pytest.mark.parametrize(("expires_at", "expected"), [
    ("2030-01-01T00:00:00+00:00", 1_893_456_000 * 10**9),
    ("2030-01-01T00:00:00Z", 1_893_456_000 * 10**9),
    ("2030-01-01T00:00:00", 1_893_456_000 * 10**9),  # naive: UTC
    ("2030-01-01T05:30:00.5+05:30", 1_893_456_000 * 10**9 + 500_000_000),
    (None, None),
])
def test_expiry_is_read_as_utc(expires_at: Any, expected: int | None) -> None:
    doc = f'{{"approval_id": "APR-1", "action": "x", "expires_at": {_json(expires_at)}}}'
    assert parse_record(doc.encode(), "APR-1").expires_ns == expected


def _json(value: Any) -> str:
    return "null" if value is None else f'"{value}"'


def test_the_backend_exists_only_with_approvals_url() -> None:
    backend = "http://127.0.0.1:9"
    assert approvals.create(Settings(plant_backend_url=backend)) is None
    made = approvals.create(Settings(plant_backend_url=backend,
                                     approvals_url="https://pp.test/api/pp/approvals/"))
    assert isinstance(made, HttpApprovals) and made.url == "https://pp.test/api/pp/approvals"


def test_approvals_url_must_be_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANT_BACKEND_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("APPROVALS_URL", "ftp://pp.test/approvals")
    with pytest.raises(SettingsError, match="APPROVALS_URL"):
        load_settings()
