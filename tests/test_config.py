"""Settings: environment over dmipro.yaml over defaults, and clear errors for bad settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmipro.config import Settings, get_settings, reload_settings
from dmipro.errors import ConfigError


def _write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "dmipro.yaml"
    path.write_text(text)
    monkeypatch.setenv("DMIPRO_CONFIG", str(path))
    return path


def test_environment_overrides_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_config(
        tmp_path,
        monkeypatch,
        "database_url: sqlite:////from/yaml.db\n"
        "allowed_modules: [yamlpkg, other]\n"
        "capture_text: true\n"
        "registry: {auto_deploy: true, deploy_margin: 2.5}\n",
    )
    monkeypatch.setenv("DMIPRO_DATABASE_URL", "sqlite:////from/env.db")
    settings = reload_settings()
    assert settings.database_url == "sqlite:////from/env.db"
    assert settings.effective_database_url == "sqlite:////from/env.db"
    # DMIPRO_ALLOWED_MODULES is set by the test fixture, so it wins over the file too.
    assert settings.allowed_modules == ("examples", "tests")
    # Keys only in the file come from the file.
    assert settings.capture_text is True
    assert settings.registry.auto_deploy is True and settings.registry.deploy_margin == 2.5


def test_config_file_values_are_used_when_the_environment_is_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_config(tmp_path, monkeypatch, "allowed_modules: [yamlpkg, other]\nstorage: /srv/programs\n")
    monkeypatch.delenv("DMIPRO_ALLOWED_MODULES")
    settings = reload_settings()
    assert settings.allowed_modules == ("yamlpkg", "other")
    assert settings.storage == "/srv/programs"


def test_get_settings_is_built_once_and_reload_rereads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = get_settings()
    assert get_settings() is first
    monkeypatch.setenv("DMIPRO_ALLOWED_MODULES", "elsewhere")
    assert get_settings().allowed_modules == ("examples", "tests")
    assert reload_settings().allowed_modules == ("elsewhere",)


def test_comma_separated_lists_are_split_and_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMIPRO_ALLOWED_MODULES", " examples , my_pkg.jobs,, tests ")
    monkeypatch.setenv("DMIPRO_SUBSCRIBERS", "otel,langfuse")
    settings = reload_settings()
    assert settings.allowed_modules == ("examples", "my_pkg.jobs", "tests")
    assert settings.subscribers == ("otel", "langfuse")

    monkeypatch.setenv("DMIPRO_SUBSCRIBERS", "")
    assert reload_settings().subscribers == ()


def test_default_database_is_a_sqlite_file_under_home(dmipro_home: Path) -> None:
    settings = reload_settings()
    assert settings.home == dmipro_home
    assert settings.effective_database_url == f"sqlite:///{(dmipro_home / 'dmipro.db').resolve()}"


def test_relative_home_is_resolved_so_the_url_survives_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DMIPRO_HOME", "relhome")
    url = reload_settings().effective_database_url
    assert url == f"sqlite:///{(tmp_path / 'relhome' / 'dmipro.db').resolve()}"


def test_defaults_without_environment_or_file(tmp_path: Path) -> None:
    settings = Settings.load(env={}, config_file=tmp_path / "absent.yaml")
    assert settings.allowed_modules == ("examples",)
    assert settings.subscribers == ()
    assert settings.effective_database_url.endswith("/.dmipro/dmipro.db")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("allowed_modules: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("databse_url: sqlite:///x.db\n", "databse_url"),
        ("registry: {auto_deploy: true, margin: 1}\n", "registry.margin"),
        ("capture_text: sometimes\n", "capture_text"),
    ],
    ids=["bad-yaml", "not-a-mapping", "unknown-key", "unknown-nested-key", "bad-value"],
)
def test_bad_config_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    path = _write_config(tmp_path, monkeypatch, text)
    with pytest.raises(ConfigError, match=expected) as info:
        reload_settings()
    assert str(path) in str(info.value)


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMIPRO_CAPTURE_TEXT", "sometimes")
    with pytest.raises(ConfigError, match="DMIPRO_CAPTURE_TEXT"):
        reload_settings()
