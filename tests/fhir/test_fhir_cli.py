"""The prifed data commands, run through typer's test runner."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fhir_cases import EXAMPLES, FIXTURES, patient, write_ndjson
from prifed.cli import run
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


def north_table(tmp_path: Path) -> Path:
    output, _ = convert(tmp_path, "north", FIXTURES / "carebundle")
    return output


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp"))


def test_stack_rejects_output_that_is_an_input(tmp_path: Path) -> None:
    table = north_table(tmp_path)
    before = table.read_bytes()
    same = tmp_path / "sub" / ".." / table.name
    (tmp_path / "sub").mkdir()
    result = runner.invoke(data_app, ["stack", str(table), "--output", str(same)])
    assert isinstance(result.exception, DataError)
    assert "is also an input" in str(result.exception)
    assert table.read_bytes() == before


def test_stack_missing_input_leaves_no_output(tmp_path: Path) -> None:
    table = north_table(tmp_path)
    stacked = tmp_path / "s1.csv"
    result = runner.invoke(data_app, ["stack", str(table), str(tmp_path / "nope.csv"),
                                      "--output", str(stacked)])
    assert isinstance(result.exception, DataError)
    assert "nope.csv not found" in str(result.exception)
    assert not stacked.exists()
    assert leftovers(tmp_path) == []


def test_stack_failure_keeps_previous_output(tmp_path: Path) -> None:
    table = north_table(tmp_path)
    stacked = tmp_path / "all.csv"
    stacked.write_text("previous\n", encoding="utf-8")
    result = runner.invoke(data_app, ["stack", str(table), str(table),
                                      "--output", str(stacked)])
    assert isinstance(result.exception, DataError)
    assert "appears in both" in str(result.exception)
    assert stacked.read_text(encoding="utf-8") == "previous\n"
    assert leftovers(tmp_path) == []


def test_stack_output_is_folder(tmp_path: Path) -> None:
    table = north_table(tmp_path)
    result = runner.invoke(data_app, ["stack", str(table), "--output", str(tmp_path)])
    assert isinstance(result.exception, DataError)
    expected = f"--output {tmp_path} is a folder; expected a file name"
    assert str(result.exception) == expected


def test_from_fhir_checks_output_before_reading(tmp_path: Path) -> None:
    # The input does not exist either: the output must be checked first.
    output = tmp_path / "missing" / "x.csv"
    result = runner.invoke(data_app, [
        "from-fhir", str(tmp_path / "no-export"), "--spec", SPEC, "--site", "x",
        "--output", str(output)])
    assert isinstance(result.exception, DataError)
    assert str(result.exception) == (
        f"--output {output}: folder {output.parent} does not exist")


def test_from_fhir_failed_import_leaves_no_files(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("no FHIR here", encoding="utf-8")
    result = runner.invoke(data_app, [
        "from-fhir", str(export), "--spec", SPEC, "--site", "x",
        "--output", str(tmp_path / "x.csv"), "--report", str(tmp_path / "x.json"),
        "--rejections", str(tmp_path / "x-rejections.csv")])
    assert isinstance(result.exception, DataError)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["export"]


def test_from_fhir_output_same_as_report(tmp_path: Path) -> None:
    output = tmp_path / "x.csv"
    result = runner.invoke(data_app, [
        "from-fhir", str(FIXTURES / "carebundle"), "--spec", SPEC, "--site", "x",
        "--output", str(output), "--report", str(output)])
    assert isinstance(result.exception, DataError)
    assert "is the same file as --output" in str(result.exception)


def test_max_resource_bytes_option(tmp_path: Path) -> None:
    export = write_ndjson(tmp_path / "export", [patient("p1"), patient("p2")])
    report = tmp_path / "x.json"
    result = runner.invoke(data_app, [
        "from-fhir", str(export), "--spec", SPEC, "--site", "x",
        "--output", str(tmp_path / "x.csv"), "--report", str(report),
        "--max-resource-bytes", "60"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["rejections"] == [{"resource_type": "(undecoded)",
                                   "reason": "resource_too_large",
                                   "element": "(root)", "feature": None,
                                   "count": 2}]


def test_run_prints_one_error_line(tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    status = run(["data", "stack", str(tmp_path / "a.csv"), "--output", str(tmp_path)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert status == 2
    expected = f"error: --output {tmp_path} is a folder; expected a file name"
    assert text.strip() == expected
