"""Redaction of the usual spellings of passwords and secrets in audit rows and log lines.

Table-driven: every spelling, in every case, is masked in a request body, a query string and
a header of the row the recorder writes; ordinary fields are kept as sent.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from plant_gateway.audit.recorder import AuditRecorder
from plant_gateway.audit.schema import from_wire
from plant_gateway.context import RequestContext
from plant_gateway.logs import JsonFormatter
from plant_gateway.redaction import sensitive_key
from plant_gateway.settings import Settings

SECRET_KEYS = [
    # passwords
    "password", "passwd", "pass", "pw", "pwd", "pword", "pswd", "passphrase", "passcode",
    "new_password", "oldPassword", "password2", "confirm-password", "userpassword", "db_pwd",
    "pass_word", "user_pass", "admin_pw", "PasswordHash",
    # secrets, keys, tokens
    "secret", "client_secret", "clientSecret", "secret_key", "api_key", "apikey", "api-key",
    "ApiKey", "x-api-key", "XApiKey", "access_key", "private_key", "signing_key", "key",
    "token", "access_token", "refresh_token", "id_token", "auth_token", "accessToken",
    "csrf_token", "bearer", "jwt", "authorization", "auth", "credentials", "session_id",
    "sessionId", "cookie", "signature",
    # one-time codes and PINs
    "otp", "otp_code", "totp", "mfa_code", "verification_code", "2fa_code", "code",
    "security_code", "pin", "pin_code", "pincode",
    # cards and accounts
    "cvv", "cvv2", "cvc", "card_number", "cardNumber", "credit_card", "cc_number", "pan",
    "iban", "ssn", "account_number", "routing_number",
    # the service key under its usual names
    "registration key", "registration_key", "registrationKey", "X-CP-Registration-Key",
]
PLAIN_KEYS = [
    "task", "name", "email", "customer_id", "amount", "max_tokens", "passenger", "shipping",
    "sort_order", "author", "keyword", "status_code", "country_code", "description", "spin",
    "compass", "id", "user_id", "limit",
]
VALUE = "s3cr3t-Value-42"


def recorder(tmp_path: Path) -> tuple[AuditRecorder, list[dict[str, Any]]]:
    settings = Settings(plant_backend_url="http://127.0.0.1:9", state_dir=tmp_path,
                        guards=["audit"], database_url=None)
    rows: list[dict[str, Any]] = []

    class Sink:
        def submit(self, line: bytes) -> None:
            rows.append(from_wire(line))

    return AuditRecorder(settings, Sink()), rows


def row_for(tmp_path: Path, key: str) -> dict[str, Any]:
    """The audit row of a POST carrying ``key`` in its JSON body, query string and headers."""
    rec, rows = recorder(tmp_path)
    ctx = RequestContext(request_id=str(uuid.uuid4()), correlation_id=str(uuid.uuid4()),
                         method="POST", path="/api/v1/x", query_string=f"{key}={VALUE}",
                         headers={"host": "h", key.lower(): VALUE}, client_ip="127.0.0.1")
    ctx.status_code = 200
    ctx.request_body_sample = json.dumps({key: VALUE, "nested": [{key: VALUE}]}).encode()
    rec.record(ctx)
    return rows[0]


@pytest.mark.parametrize("spelling", ["lower", "upper", "title"])
@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_field_is_masked_in_body_query_and_headers(
    tmp_path: Path, key: str, spelling: str
) -> None:
    key = {"lower": key, "upper": key.upper(), "title": key.title()}[spelling]
    row = row_for(tmp_path, key)
    body = json.loads(row["request_body"])
    assert body == {key: "***", "nested": [{key: "***"}]}
    assert json.loads(row["query_params"]) == {key: "***"}
    assert json.loads(row["request_headers"])[key.lower()] == "***"
    assert VALUE not in json.dumps(row, default=str)


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_ordinary_field_is_kept(tmp_path: Path, key: str) -> None:
    row = row_for(tmp_path, key)
    assert json.loads(row["request_body"]) == {key: VALUE, "nested": [{key: VALUE}]}
    assert json.loads(row["query_params"]) == {key: VALUE}
    assert sensitive_key(key) is False


@pytest.mark.parametrize("key", ["pass", "pw", "PWD", "client_secret", "otp_code", "cvv"])
def test_log_lines_hide_the_same_fields(key: str) -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "login attempt", None, None)
    record.form = {key: VALUE, "user": "alice"}
    line = json.loads(JsonFormatter().format(record))
    assert line["form"] == {key: "[REDACTED]", "user": "alice"}
