"""``deploy/plant-gateway.example.yaml`` cannot rot: it loads through the settings, names every
setting, states the defaults, and its commented-out examples load too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from plant_gateway.settings import Settings, config_keys, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "plant-gateway.example.yaml"
EXAMPLE_LINE = re.compile(r"^# ([a-z_]+): ", re.MULTILINE)  # an example to switch on
SECRET = "s" * 40
# values the example sets on purpose (the backend is required; the rest are computed)
NOT_DEFAULTS = {"plant_backend_url", "instance_id", "jwt_secret"}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting from this process's environment may mask the file's values."""
    for key in config_keys():
        monkeypatch.delenv(key.upper(), raising=False)
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("JWT_SECRET", SECRET)
    return monkeypatch


def load(path: Path, env: pytest.MonkeyPatch) -> Settings:
    env.setenv("PLANT_CONFIG", str(path))
    return load_settings()


def test_every_setting_is_in_the_example() -> None:
    text = EXAMPLE.read_text()
    active = yaml.safe_load(text)
    keys = config_keys()
    named = {keys[k] for k in active} | {keys[k] for k in EXAMPLE_LINE.findall(text) if k in keys}
    assert set(Settings.model_fields) - named == set()


def test_the_example_loads_and_states_the_defaults(clean_env: pytest.MonkeyPatch) -> None:
    loaded = load(EXAMPLE, clean_env)
    defaults = Settings(plant_backend_url="http://127.0.0.1:8080")
    differ = {
        name for name in Settings.model_fields
        if name not in NOT_DEFAULTS and getattr(loaded, name) != getattr(defaults, name)
    }
    assert differ == set()
    assert loaded.plant_backend_url == "http://127.0.0.1:8080"


def test_the_example_lines_load_when_switched_on(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    text = EXAMPLE.read_text()
    switched = EXAMPLE_LINE.sub(lambda m: f"{m.group(1)}: ", text)
    assert switched != text
    path = tmp_path / "switched.yaml"
    path.write_text(switched)
    loaded = load(path, clean_env)
    assert loaded.instance_id == "gw-1"
    assert loaded.opa_service_url == "http://opa.internal:8181"
    assert loaded.database_url is not None
