"""The ``prifed he`` commands."""

from __future__ import annotations

import stat
from pathlib import Path

from typer.testing import CliRunner

from prifed.errors import ConfigError
from prifed.he.cli import COORDINATOR_FILE, SITE_FILE, he_app
from prifed.he.keys import read_key_file

runner = CliRunner()


def test_keygen_writes_site_and_coordinator_files(tmp_path: Path) -> None:
    result = runner.invoke(he_app, ["keygen", "--sites", "4", "--max-weight", "500",
                                    "--out", str(tmp_path), "--run", "heart-1"])
    assert result.exit_code == 0, result.output
    site = read_key_file(tmp_path / SITE_FILE)
    coordinator = read_key_file(tmp_path / COORDINATOR_FILE)
    assert site.has_secret_key
    assert not coordinator.has_secret_key
    assert site.key_id == coordinator.key_id
    assert site.key_id in result.output
    assert site.params.num_sites == 4
    assert site.params.max_weight == 500
    assert stat.S_IMODE((tmp_path / SITE_FILE).stat().st_mode) == 0o600


def test_keygen_rejects_overwrite(tmp_path: Path) -> None:
    args = ["keygen", "--sites", "2", "--out", str(tmp_path)]
    assert runner.invoke(he_app, args).exit_code == 0
    second = runner.invoke(he_app, args)
    assert isinstance(second.exception, ConfigError)
    assert "pass --force to overwrite" in str(second.exception)


def test_rotate_keeps_parameters_and_changes_key(tmp_path: Path) -> None:
    first, second = tmp_path / "run1", tmp_path / "run2"
    runner.invoke(he_app, ["keygen", "--sites", "3", "--out", str(first)])
    result = runner.invoke(he_app, ["rotate", "--site-context",
                                    str(first / SITE_FILE), "--out", str(second),
                                    "--run", "run-2"])
    assert result.exit_code == 0, result.output
    old, new = read_key_file(first / SITE_FILE), read_key_file(second / SITE_FILE)
    assert new.key_id != old.key_id
    assert new.previous_key_id == old.key_id
    assert new.params == old.params
    assert f"replaces key {old.key_id}" in result.output


def test_inspect_reports_the_secret_key(tmp_path: Path) -> None:
    runner.invoke(he_app, ["keygen", "--sites", "2", "--out", str(tmp_path)])
    site = runner.invoke(he_app, ["inspect", str(tmp_path / SITE_FILE)])
    coordinator = runner.invoke(he_app, ["inspect", str(tmp_path / COORDINATOR_FILE)])
    assert "secret key           yes" in site.output
    assert "secret key           no" in coordinator.output
    assert "coordinator context" in coordinator.output


def test_export_coordinator_from_site_context(tmp_path: Path) -> None:
    runner.invoke(he_app, ["keygen", "--sites", "2", "--out", str(tmp_path)])
    out = tmp_path / "again.safetensors"
    result = runner.invoke(he_app, ["export-coordinator", "--site-context",
                                    str(tmp_path / SITE_FILE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not read_key_file(out).has_secret_key


def test_params_rejects_unreachable_precision() -> None:
    result = runner.invoke(he_app, ["params", "--sites", "100", "--precision",
                                    "1e-12"])
    assert isinstance(result.exception, ConfigError)
    assert "finer than float64 decoding" in str(result.exception)


def test_explicit_parameters_are_checked() -> None:
    result = runner.invoke(he_app, ["keygen", "--sites", "10", "--out", "unused",
                                    "--degree", "4096", "--coeff-bits", "40,24,40",
                                    "--scale-bits", "24"])
    assert isinstance(result.exception, ConfigError)
    assert "use scale_bits of at least" in str(result.exception)
    partial = runner.invoke(he_app, ["keygen", "--sites", "10", "--out", "unused",
                                     "--degree", "4096"])
    assert "go together" in str(partial.exception)
