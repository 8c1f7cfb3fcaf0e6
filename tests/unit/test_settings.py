from __future__ import annotations

from pathlib import Path

import pytest

from cxr_pipeline.errors import ConfigError, Reason
from cxr_pipeline.settings import Settings, load_settings


def test_defaults_are_valid() -> None:
    settings = load_settings(None)
    assert isinstance(settings, Settings)
    assert settings.listener.port == 11112
    assert settings.worker.broker_url is None  # embedded default


def test_toml_file_then_environment_then_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[listener]\nport = 2000\nae_title = "FROM_FILE"\n[explain]\nmethod = "occlusion"\n'
    )
    monkeypatch.setenv("CXR_LISTENER__PORT", "3000")
    settings = load_settings(config)
    assert settings.listener.port == 3000  # environment beats the file
    assert settings.listener.ae_title == "FROM_FILE"
    assert settings.explain.method == "occlusion"
    settings = load_settings(config, listener={"port": 4000})
    assert settings.listener.port == 4000  # explicit overrides beat the environment
    assert settings.listener.ae_title == "FROM_FILE"


def test_config_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[model]\nbatch_size = 4\n")
    monkeypatch.setenv("CXR_CONFIG", str(config))
    assert load_settings().model.batch_size == 4


@pytest.mark.parametrize(
    "text",
    [
        "unknown_top = 1\n",
        "[listener]\nprot = 11112\n",  # typo in a nested key
        "[listener]\nport = 'not a number'\n",
        "[explain]\nmethod = 'magic'\n",
    ],
)
def test_unknown_or_invalid_keys_are_errors(tmp_path: Path, text: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert info.value.reason is Reason.CONFIG_ERROR


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[listener\n")
    with pytest.raises(ConfigError):
        load_settings(broken)


def test_settings_are_frozen() -> None:
    settings = load_settings(None)
    with pytest.raises(ValueError):
        settings.listener.port = 1  # type: ignore[misc]
