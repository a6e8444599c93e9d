"""Configuration: YAML + environment, validated with errors named by key path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config

CLI = [sys.executable, "-m", "proxy"]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_env() -> None:
    cfg = load_config(None, environ={})
    assert cfg.server.host == "127.0.0.1"
    assert cfg.upstream.base_url == "https://api.openai.com/v1"
    assert cfg.upstream.api_key is None
    assert cfg.source == "embedded defaults"


def test_file_and_env_override(tmp_path: Path) -> None:
    path = _write(tmp_path, "server:\n  port: 9001\nupstream:\n  base_url: http://u:1/v1\n")
    cfg = load_config(path, environ={"SIDECAR_SERVER__PORT": "9002",
                                     "SIDECAR_UPSTREAM__READ_TIMEOUT_S": "5"})
    assert cfg.server.port == 9002
    assert cfg.upstream.base_url == "http://u:1/v1"
    assert cfg.upstream.read_timeout_s == 5.0
    assert cfg.source == str(path)


def test_env_names_config_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "server:\n  port: 9003\n")
    assert load_config(None, environ={"SIDECAR_CONFIG": str(path)}).server.port == 9003


def test_every_problem_is_named_by_path(tmp_path: Path) -> None:
    path = _write(tmp_path, (
        "server:\n  port: -1\n  hots: x\n"
        "upstream:\n  base_url: ftp://x\n  read_timeout_s: fast\n"
        "logging:\n  level: loud\n"
        "nonsense: 1\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    problems = info.value.problems
    assert "server.port: must be >= 0, got -1" in problems
    assert "server.hots: unknown key (did you mean 'host'?)" in problems
    assert "upstream.read_timeout_s: must be a number, got string 'fast'" in problems
    assert "logging.level: must be one of debug, info, warning, error, got 'loud'" in problems
    assert "nonsense: unknown key" in problems
    assert any(p.startswith("upstream.base_url: must be an http(s) URL") for p in problems)


def test_api_key_never_in_repr(tmp_path: Path) -> None:
    cfg = load_config(None, environ={"SIDECAR_UPSTREAM__API_KEY": "sk-very-secret"})
    assert cfg.upstream.resolved_api_key() == "sk-very-secret"
    assert "sk-very-secret" not in repr(cfg)


def test_credentials_in_base_url_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={
            "SIDECAR_UPSTREAM__BASE_URL": "https://user:hunter2@gw.example/v1"})
    assert info.value.problems[0].startswith(
        "upstream.base_url: must not contain credentials")
    assert "hunter2" not in str(info.value)


def test_api_key_env_must_exist(tmp_path: Path) -> None:
    path = _write(tmp_path, "upstream:\n  api_key_env: SIDECAR_TEST_SURELY_UNSET_VAR\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.problems == [
        "upstream.api_key_env: environment variable SIDECAR_TEST_SURELY_UNSET_VAR "
        "is not set or empty"]


@pytest.mark.parametrize(("text", "expected"), [
    ("server: [1, 2]\n", "server: must be a mapping, got a list"),
    ("- a\n- b\n", "the top level must be a mapping"),
    ("server:\n  port: [\n", "not valid YAML (line"),
])
def test_malformed_files(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text), environ={})
    assert expected in str(info.value)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    good = _write(tmp_path, "server:\n  port: 8081\n")
    ok = subprocess.run([*CLI, "check-config", str(good)], capture_output=True, text=True,
                        env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream:\n  max_connections: 0\n")
    res = subprocess.run([*CLI, "check-config", str(bad)], capture_output=True, text=True,
                         env=env, check=False)
    assert res.returncode == 2
    assert "upstream.max_connections: must be > 0, got 0" in res.stderr
    # serve validates the same way and stops before listening.
    res = subprocess.run([*CLI, "serve", "--config", str(bad)], capture_output=True,
                         text=True, env=env, check=False, timeout=30)
    assert res.returncode == 2
    assert "upstream.max_connections" in res.stderr
    missing = subprocess.run([*CLI, "check-config", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, env=env, check=False)
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr


def test_semantic_thresholds_are_checked(tmp_path: Path) -> None:
    path = _write(tmp_path, (
        "cache:\n  semantic: true\n  semantic_threshold: 1.5\n"
        "  semantic_thresholds:\n    'gpt-4o*': 0\n    'o3*': high\n"))
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    problems = info.value.problems
    assert "cache.semantic_threshold: must be <= 1, got 1.5" in problems
    assert "cache.semantic_thresholds.o3*: must be a number, got string 'high'" in problems
    path = _write(tmp_path, "cache:\n  semantic_thresholds:\n    'gpt-4o*': 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.problems == ["cache.semantic_thresholds.gpt-4o*: must be in (0, 1], "
                                   "got 0.0"]
