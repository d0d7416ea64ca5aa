"""The prifed data commands, run through typer's test runner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from typer.testing import CliRunner

from fhir_cases import EXAMPLES, FIXTURES
from prifed.errors import ConfigError, DataError
from prifed.fhir import spec_hash
from prifed.fhir.cli import data_app

runner = CliRunner()
SPEC = str(EXAMPLES / "spec.toml")


def convert(tmp_path: Path, site: str, source: Path) -> tuple[Path, Path]:
    output, report = tmp_path / f"{site}.csv", tmp_path / f"{site}.json"
    result = runner.invoke(data_app, [
        "from-fhir", str(source), "--spec", SPEC, "--site", site,
        "--output", str(output), "--report", str(report),
        "--rejections", str(tmp_path / f"{site}-rejections.csv"),
    ])
    assert result.exit_code == 0, result.output
    return output, report


def test_from_fhir_writes_table_and_report(tmp_path: Path) -> None:
    output, report = convert(tmp_path, "north", FIXTURES / "carebundle")
    with output.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][0] == "site"
    assert rows[0][-1] == "t2d_1y"
    assert {row[0] for row in rows[1:]} == {"north"}
    data = json.loads(report.read_text())
    assert data["patients"]["in_table"] == len(rows) - 1
    assert data["spec_hash"] == spec_hash(SPEC)
    log = (tmp_path / "north-rejections.csv").read_text().splitlines()
    assert log[0] == "resource_type,resource_id,reason,element,feature,source"


def test_spec_hash_command() -> None:
    result = runner.invoke(data_app, ["spec-hash", SPEC])
    assert result.exit_code == 0
    assert result.output.strip() == spec_hash(SPEC)


def test_merge_and_stack(tmp_path: Path) -> None:
    north_csv, north_json = convert(tmp_path, "north", FIXTURES / "carebundle")
    other = tmp_path / "copy"
    other.mkdir()
    for path in (FIXTURES / "carebundle").glob("*.json"):
        (other / path.name).write_bytes(path.read_bytes())
    south_csv, south_json = convert(tmp_path, "south", other)

    merged = tmp_path / "federation.json"
    result = runner.invoke(data_app, ["merge-reports", str(north_json),
                                      str(south_json), "--output", str(merged)])
    assert result.exit_code == 0, result.output
    assert "(all)" in result.output
    assert [row["site"] for row in json.loads(merged.read_text())["sites"]] == [
        "north", "south", "(all)"]

    stacked = tmp_path / "all.csv"
    result = runner.invoke(data_app, ["stack", str(north_csv), str(south_csv),
                                      "--output", str(stacked)])
    assert result.exit_code == 0, result.output
    lines = stacked.read_text().splitlines()
    assert len(lines) == 1 + 2 * (len(north_csv.read_text().splitlines()) - 1)

    result = runner.invoke(data_app, ["stack", str(north_csv), str(north_csv),
                                      "--output", str(stacked)])
    assert isinstance(result.exception, DataError)


def test_bad_spec_is_config_error(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text('name = "x"\n', encoding="utf-8")
    result = runner.invoke(data_app, [
        "from-fhir", str(FIXTURES / "carebundle"), "--spec", str(spec),
        "--site", "north", "--output", str(tmp_path / "out.csv")])
    assert isinstance(result.exception, ConfigError)


def test_bad_site_name(tmp_path: Path) -> None:
    result = runner.invoke(data_app, [
        "from-fhir", str(FIXTURES / "carebundle"), "--spec", SPEC,
        "--site", "north site", "--output", str(tmp_path / "out.csv")])
    assert isinstance(result.exception, ConfigError)
    assert "site name" in str(result.exception)
