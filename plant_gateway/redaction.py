"""Redaction of secrets in what the gateway keeps (audit rows, logs): by key name and by value.

One word list for every sink, so an audit row and a log line hide the same fields. A key is
split into words (separators and camelCase, lower-cased, trailing digits dropped) and judged
case-insensitively; values are scanned for known secrets, JWTs and card numbers.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

MASK = "***"
# A key holding one of these words is sensitive: ``pw``, ``user_pwd``, ``Pass``, ``cvv2``.
# Short words only match as a whole word ("pin" must not hide "shipping").
SECRET_WORDS = frozenset({
    "password", "passwords", "passwd", "pass", "pw", "pwd", "pword", "pswd", "psw", "passw",
    "passwort", "passcode", "passphrase", "secret", "secrets", "token", "otp", "totp",
    "hotp", "card", "cardnumber", "cvv", "cvc", "cvn", "pan", "pin", "pincode", "iban", "ssn",
    "apikey", "authorization", "cookie", "signature", "credential", "credentials",
    "privatekey", "bearer", "jwt", "sessionid", "csrf", "xsrf",
})
# A word written as one ("userpassword", "accesstoken", "XAPIKEY") is sensitive when it starts
# or ends with one of these; "max_tokens" and "token_count"-like counters are not ("tokens").
SECRET_PREFIXES = ("password", "passwd", "passphrase", "secret")
SECRET_SUFFIXES = ("password", "passwd", "pwd", "passphrase", "passcode", "secret", "token",
                   "apikey", "accesskey", "secretkey", "privatekey", "credential", "credentials")
# A key that is exactly one of these is sensitive ({"key": "AIza..."}, ?key=...), a longer one
# containing them is not ("sort_key", "auth_method").
SECRET_KEYS = frozenset({"key", "auth", "xauth", "basicauth"})
CODE_WORDS = frozenset({
    "otp", "verification", "verify", "auth", "security", "sms", "mfa", "totp", "access",
    "recovery", "backup", "one", "login", "confirmation", "reset", "pin", "2fa",
})
PAIR_WORDS = (("account", "number"), ("account", "no"), ("account", "num"), ("routing", "number"),
              ("registration", "key"), ("api", "key"), ("private", "key"), ("client", "secret"),
              ("sort", "code"), ("bank", "account"), ("acct", "number"), ("acct", "no"),
              ("access", "key"), ("signing", "key"), ("encryption", "key"), ("master", "key"),
              ("session", "key"), ("session", "id"), ("auth", "key"), ("client", "key"),
              ("credit", "card"), ("cc", "number"), ("cc", "num"), ("security", "answer"))
# the pairs written as one word: "registrationkey", "accountnumber", "ccnum"
JOINED_PAIRS = frozenset(a + b for a, b in PAIR_WORDS)
JWT_RE = re.compile(r"eyJ[\w-]{5,}\.[\w-]{5,}\.[\w-]*")
DIGITS_RE = re.compile(r"(?:\d[ -]?){13,19}")
_CAMEL = re.compile(r"([a-z])([A-Z])")  # "userPassword"; not "2FA"
_ACRONYM = re.compile(r"([A-Z]+)([A-Z][a-z])")  # "XApiKey" -> "X ApiKey"
_SEPARATORS = re.compile(r"[^a-z0-9]+")
MAX_DEPTH = 32  # deeper values are masked whole


def words(key: str) -> list[str]:
    """The key's words, lower-case, trailing digits dropped: ``newPassword2`` -> new, password."""
    spaced = _CAMEL.sub(r"\1 \2", _ACRONYM.sub(r"\1 \2", key))
    out = []
    for word in _SEPARATORS.split(spaced.lower()):
        trimmed = word.rstrip("0123456789") or word  # "cvv2" -> "cvv"; "2" stays "2"
        if word:
            out.append(trimmed)
    return out


def _secret_word(word: str) -> bool:
    return (word in SECRET_WORDS or word in JOINED_PAIRS or word.startswith(SECRET_PREFIXES)
            or word.endswith(SECRET_SUFFIXES))


@lru_cache(maxsize=4096)
def sensitive_key(key: str) -> bool:
    """Whether a field, query parameter or header of this name holds a secret."""
    parts = words(key)
    if not parts:
        return False
    joined = "".join(parts)  # "pass_word", "api-key", "Registration Key"
    if joined in SECRET_KEYS or _secret_word(joined) or any(_secret_word(w) for w in parts):
        return True
    if "code" in parts and (len(parts) == 1 or any(w in CODE_WORDS for w in parts)):
        return True
    return any(a in parts and b in parts for a, b in PAIR_WORDS)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = int(ch)
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return MASK if 13 <= len(digits) <= 19 and _luhn(digits) else match.group(0)


def mask_text(value: str, secrets_: tuple[str, ...]) -> str:
    """Mask known secrets, JWTs and card numbers in free text; the common case costs 2 scans."""
    for s in secrets_:
        if s and s in value:
            return MASK
    if "eyJ" in value:
        value = JWT_RE.sub(MASK, value)
    if len(value) >= 13 and DIGITS_RE.search(value) is not None:  # a card: 13 digits or more
        value = DIGITS_RE.sub(_card, value)
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def redact(value: Any, secrets_: tuple[str, ...] = (), depth: int = 0) -> Any:
    """Mask sensitive fields recursively (by key) and card numbers, JWTs, known keys (by value)."""
    if depth > MAX_DEPTH:
        return MASK
    if isinstance(value, dict):
        return {
            str(k): MASK if sensitive_key(str(k)) else redact(v, secrets_, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v, secrets_, depth + 1) for v in value]
    if isinstance(value, str):
        return mask_text(value, secrets_)
    return value
