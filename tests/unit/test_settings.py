"""A bad setting is one line naming it: URLs without a host, Redis and PostgreSQL URLs that
are not one, config files that do not parse or hold a misspelled key."""

from __future__ import annotations

from pathlib import Path

import pytest

from plant_gateway.settings import Settings, SettingsError, config_keys, load_settings

BASE = {"PLANT_BACKEND_URL": "http://127.0.0.1:9", "JWT_SECRET": "s" * 40}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in config_keys():
        monkeypatch.delenv(key.upper(), raising=False)
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("PLANT_CONFIG", raising=False)
    for key, value in BASE.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def error(env: pytest.MonkeyPatch, **values: str) -> str:
    for key, value in values.items():
        env.setenv(key, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("PLANT_BACKEND_URL", "http://", "PLANT_BACKEND_URL: has no host"),
    ("PLANT_BACKEND_URL", "http://backend:port", "PLANT_BACKEND_URL: has an invalid port"),
    ("PLANT_BACKEND_URL", "ftp://backend", "PLANT_BACKEND_URL: must be an http:// or https://"),
    ("OPA_URL", "https://", "OPA_SERVICE_URL: has no host"),  # its alias
    ("REDIS_URL", "garbage", "REDIS_URL: must be a redis://, rediss:// or unix:// URL"),
    ("REDIS_URL", "redis://cache:six/0", "REDIS_URL: has an invalid port"),
    ("DATABASE_URL", "garbage", "DATABASE_URL: must be a postgresql:// URL"),
    ("DATABASE_URL", "mysql://db/x", "DATABASE_URL: must be a postgresql:// URL"),
])
def test_a_url_that_cannot_work_is_refused_by_name(
    env: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    message = error(env, **{name: value})
    assert message.startswith(expected)
    assert "Value error" not in message


def test_url_messages_never_echo_a_password(env: pytest.MonkeyPatch) -> None:
    assert "hunter2" not in error(env, REDIS_URL="redis://:hunter2@cache:x/0")
    assert "hunter2" not in error(env, DATABASE_URL="postgres://u:hunter2@db:x/audit")


def test_usable_urls_are_kept_and_empty_means_unset(env: pytest.MonkeyPatch) -> None:
    env.setenv("DATABASE_URL", "postgresql+asyncpg://writer:pw@db:5432/plant")
    env.setenv("REDIS_URL", "")
    settings = load_settings()
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == "postgresql://writer:pw@db:5432/plant"
    assert settings.redis_url is None and settings.effective_redis_url is None


def config(env: pytest.MonkeyPatch, tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    env.setenv("PLANT_CONFIG", str(path))
    return path


def test_invalid_yaml_names_the_file_and_line(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = config(env, tmp_path, "port: 8000\nplant_guards: [auth\n")
    message = error(env)
    assert message.startswith(f"PLANT_CONFIG: {path} is not valid YAML at line 3")


def test_a_config_file_must_be_a_mapping(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config(env, tmp_path, "- port\n- 8000\n")
    assert "must be a mapping of setting names to values, not a list" in error(env)


def test_a_misspelled_key_is_refused_with_a_suggestion(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = config(env, tmp_path, "port: 8000\nrate_limit_fail_mod: open\n")
    assert error(env) == (
        f"PLANT_CONFIG: unknown key 'rate_limit_fail_mod' in {path} "
        "(did you mean 'rate_limit_fail_mode'?)"
    )


def test_keys_are_field_names_or_env_names_in_any_case(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config(env, tmp_path, "state_dir: /tmp/a\nPLANT_GUARDS: [auth]\nJwt_Algorithm: HS256\n")
    settings = load_settings()
    assert settings.state_dir == Path("/tmp/a")
    assert settings.guards == ["auth"] and settings.jwt_algorithms == ["HS256"]


def test_every_setting_has_its_field_name_as_a_key() -> None:
    keys = config_keys()
    assert all(keys[name] == name for name in Settings.model_fields)
    assert keys["opa_url"] == "opa_service_url" and keys["plant_state_dir"] == "state_dir"
