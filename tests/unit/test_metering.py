"""The signed metering envelope: what verifies, and the hostile inputs that never do."""

from __future__ import annotations

import pytest

from plant_gateway import metering
from tests.integration.guards.test_counter_guards import envelope

SECRET = b"m" * 32
NOW = 1_800_000_000


def cost(headers: dict[str, str], correlation_id: str = "cid") -> float | None:
    return metering.verified_cost(headers, correlation_id, SECRET, 300, NOW)


def test_a_fresh_signed_envelope_gives_its_cost() -> None:
    assert cost(envelope("cid", "0.125", NOW, SECRET)) == pytest.approx(0.125)
    assert cost(envelope("cid", "0.125", NOW + 299, SECRET)) == pytest.approx(0.125)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("x-metering-cost-usd", "nan"),
        ("x-metering-cost-usd", "inf"),
        ("x-metering-cost-usd", "-0.5"),
        ("x-metering-cost-usd", "1e308"),
        ("x-metering-cost-usd", "zero"),
        ("x-metering-tokens-in", "12.5"),
        ("x-metering-tokens-out", ""),
        ("x-metering-timestamp", "soon"),
        ("x-metering-model", "m" * 10_000),
        ("x-metering-signature", ""),
        ("x-metering-signature", "é" * 43),
    ],
)
def test_malformed_fields_never_verify(field: str, value: str) -> None:
    headers = {**envelope("cid", "0.125", NOW, SECRET), field: value}
    assert cost(headers) is None


@pytest.mark.parametrize("missing", ["x-metering-timestamp", "x-metering-tokens-in",
                                     "x-metering-tokens-out", "x-metering-signature"])
def test_an_incomplete_envelope_never_verifies(missing: str) -> None:
    headers = envelope("cid", "0.125", NOW, SECRET)
    del headers[missing]
    assert cost(headers) is None


def test_stale_future_foreign_or_unkeyed_envelopes_never_verify() -> None:
    assert cost(envelope("cid", "0.125", NOW - 301, SECRET)) is None
    assert cost(envelope("cid", "0.125", NOW + 301, SECRET)) is None
    assert cost(envelope("cid", "0.125", NOW, SECRET), correlation_id="other") is None
    signed = envelope("cid", "0.125", NOW, SECRET)
    assert metering.verified_cost(signed, "cid", b"", 300, NOW) is None
