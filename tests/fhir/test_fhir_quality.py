"""Quality reports: validation on receipt, federation merge and warnings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fhir_cases import FIXTURES, ICD10, make_spec
from prifed.errors import ConfigError, DataError
from prifed.fhir import (
    load_report,
    load_site_table,
    load_spec,
    merge_reports,
    parse_report,
)
from prifed.fhir.quality import FeatureCounts, LabelCounts, PatientCounts, QualityReport

SPEC = make_spec()


def report(site: str, present: int = 90, missing: int = 10, nonzero: int = 30,
           positive: int = 20, negative: int = 70, read: int = 1000,
           spec_hash: str = "a" * 64) -> QualityReport:
    features = {name: FeatureCounts(present=present, missing=missing, nonzero=nonzero)
                for name in ("glucose", "hypertension")}
    return QualityReport(
        site=site, spec_name="s", spec_version="1", spec_hash=spec_hash,
        resources_read={"Observation": read},
        patients=PatientCounts(read=100, eligible=100, in_table=positive + negative),
        features=features, label=LabelCounts(positive=positive, negative=negative),
    )


def test_report_round_trip() -> None:
    original = report("north")
    assert parse_report(original.to_json()) == original
    assert parse_report(json.loads(original.to_json())) == original


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(patient_names=["x"]), "patient_names"),
    (lambda d: d["patients"].update(read=-1), "patients.read"),
    (lambda d: d.update(site="north site"), "site"),
    (lambda d: d.update(spec_hash="abc"), "spec_hash"),
    (lambda d: d["resources_read"].update({"Jane Doe": 1}), "resources_read"),
    (lambda d: d["rejections"].append({"resource_type": "Observation",
                                       "reason": "no_unit", "element": "value 7.2",
                                       "count": 1}), "rejections.0.element"),
])
def test_received_report_validated(edit, field: str) -> None:
    data = json.loads(report("north").to_json())
    edit(data)
    with pytest.raises(DataError) as raised:
        parse_report(data)
    assert field in str(raised.value)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["patients"].update(in_table=10**9),
     "patients.in_table (1000000000) must be at most patients.eligible (100)"),
    (lambda d: d["patients"].update(eligible=101),
     "patients.eligible (101) must be at most patients.read (100)"),
    (lambda d: d["patients"].update(excluded={"no_follow_up": 101}),
     "patients.excluded sums to 101; it must be at most patients.read (100)"),
    (lambda d: d["label"].update(positive=21),
     "label.positive + label.negative (91) must equal patients.in_table (90)"),
    (lambda d: d["features"]["glucose"].update(missing=11),
     "features.glucose.present + missing (101) must equal patients.eligible (100)"),
    (lambda d: d["features"]["glucose"].update(nonzero=91),
     "features.glucose.nonzero (91) must be at most its present (90)"),
    (lambda d: d["patients"].update(read=True), "patients.read: Input should be a "
                                                "valid integer (int_type)"),
    (lambda d: d["label"].update(positive=20.0), "label.positive: Input should be "
                                                 "a valid integer (int_type)"),
])
def test_inconsistent_report_rejected(tmp_path: Path, edit, message: str) -> None:
    data = json.loads(report("north").to_json())
    edit(data)
    path = tmp_path / "north-quality.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError) as raised:
        load_report(path)
    assert str(raised.value).startswith(f"invalid quality report {path}: ")
    assert message in str(raised.value)


def test_non_json_report_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "east-quality.json"
    path.write_text('{"site": "east",\n oops}', encoding="utf-8")
    with pytest.raises(DataError) as raised:
        load_report(path)
    assert str(raised.value).startswith(f"invalid quality report {path}: (document): "
                                        "Invalid JSON")
    assert "line 2 column 2" in str(raised.value)


def test_merge_totals_and_features() -> None:
    federation = merge_reports([report("a", positive=10), report("b", positive=30)])
    rows = federation.rows()
    assert [row["site"] for row in rows] == ["a", "b", "(all)"]
    assert rows[-1]["positive"] == 40
    assert rows[-1]["resources"] == 2000
    assert federation.feature_rows()[0] == {"feature": "glucose", "a": 0.9, "b": 0.9}
    assert federation.warnings == []
    assert "glucose" in federation.format_text()


def test_merge_rejects_other_spec() -> None:
    with pytest.raises(ConfigError, match=r"b \(bbbbbbbbbbbb\)"):
        merge_reports([report("a"), report("b", spec_hash="b" * 64)])
    with pytest.raises(ConfigError, match=r"a \(aaaaaaaaaaaa\)"):
        merge_reports([report("a")], expected_hash="c" * 64)


def test_merge_rejects_repeated_site() -> None:
    with pytest.raises(DataError, match="repeated: a"):
        merge_reports([report("a"), report("a")])
    with pytest.raises(DataError, match="no quality reports"):
        merge_reports([])


def test_warnings_name_site() -> None:
    federation = merge_reports([
        report("good1"), report("good2"),
        report("sparse", present=20, missing=80, nonzero=10),
        report("uncoded", nonzero=0),
        report("oneclass", positive=0),
    ])
    text = "\n".join(federation.warnings)
    assert "site sparse: feature glucose present for 20%" in text
    assert "site uncoded: feature hypertension is 0 for every patient" in text
    assert "site oneclass: every row has the same label" in text
    assert not any("good" in warning for warning in federation.warnings)


def test_broken_code_mapping_flagged(tmp_path: Path) -> None:
    """A site that codes hypertension in SNOMED CT shows up before training."""
    spec = load_spec(Path(__file__).parents[2] / "examples" / "fhir" / "spec.toml")
    reports = []
    for name, system in (("one", ICD10), ("two", ICD10),
                         ("local", "http://snomed.info/sct")):
        folder = tmp_path / name
        folder.mkdir()
        for path in sorted((FIXTURES / "carebundle").glob("*.json")):
            text = path.read_text()
            if system != ICD10:
                text = text.replace(f'"system":"{ICD10}","code":"I10"',
                                    f'"system":"{system}","code":"38341003"')
            (folder / path.name).write_text(text)
        reports.append(load_site_table(folder, spec, site=name)[1])

    warnings = merge_reports(reports).warnings
    assert any(w.startswith("site local: feature hypertension is 0") for w in warnings)
    assert reports[2].codes_not_recognised["Condition.code"] >= 1


def test_report_counts_only(tmp_path: Path) -> None:
    rows, site_report = load_site_table(FIXTURES / "carebundle", SPEC, site="n")
    data: dict[str, Any] = json.loads(site_report.to_json())
    assert set(data) == {
        "format", "site", "spec_name", "spec_version", "spec_hash", "files_read",
        "files_ignored", "resources_read", "resources_skipped", "rejections",
        "codes_not_recognised", "patients", "features", "label"}
    assert data["patients"]["in_table"] == len(rows)
