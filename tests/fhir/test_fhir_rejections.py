"""Bad records are rejected one by one, with a reason, and never shared."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fhir_cases import (
    condition,
    day,
    encounter,
    make_spec,
    observation,
    patient,
    quantity,
    write_ndjson,
)
from prifed.fhir import load_site_table


def rejections_of(report: Any) -> dict[tuple[str, str, str], int]:
    return {(r.resource_type, r.reason, r.element): r.count for r in report.rejections}


def run(tmp_path: Path, resources: list[dict[str, Any]]) -> tuple[Any, Any, Path]:
    folder = write_ndjson(tmp_path / "export", resources)
    log = tmp_path / "rejections.csv"
    rows, report = load_site_table(folder, make_spec(), site="test", rejections=log)
    return rows, report, log


def test_issue_cases_rejected_one_by_one(tmp_path: Path) -> None:
    rows, report, _ = run(tmp_path, [
        patient("p1"),
        observation("bad-date", "p1", "2345-7", 90.0, "mg/dL", "2025-02-30"),
        observation("no-value", "p1", "2345-7", None, None, day(-3)),
        observation("no-unit", "p1", "2345-7", 97.0, None, day(-2)),
        observation("orphan", "ghost", "2345-7", 99.0, "mg/dL", day(-1)),
        observation("good", "p1", "2345-7", 93.0, "mg/dL", day(-4)),
    ])
    assert rejections_of(report) == {
        ("Observation", "invalid_date", "effectiveDateTime"): 1,
        ("Observation", "no_value", "value[x]"): 1,
        ("Observation", "no_unit", "valueQuantity.code"): 1,
        ("Observation", "patient_not_found", "subject"): 1,
    }
    assert rows.loc[0, "glucose"] == 93.0
    assert report.resources_read == {"Observation": 5, "Patient": 1}


def test_value_problems(tmp_path: Path) -> None:
    _, report, _ = run(tmp_path, [
        patient("p1"),
        observation("text", "p1", "2345-7", None, None, day(-1), valueString="QNS"),
        observation("censored", "p1", "2345-7", None, None, day(-1),
                    valueQuantity={**quantity(0.1, "mg/dL"), "comparator": "<"}),
        observation("stone", "p1", "29463-7", 11.0, "[stn_av]", day(-1)),
        observation("wrong-dim", "p1", "29463-7", 70.0, "mg/dL", day(-1)),
        observation("too-high", "p1", "2345-7", 5000.0, "mg/dL", day(-1)),
        observation("unknown-date", "p1", "2345-7", 80.0, "mg/dL", None),
        observation("straddles", "p1", "2345-7", 80.0, "mg/dL", "2025"),
    ])
    assert rejections_of(report) == {
        ("Observation", "value_not_quantity", "value[x]"): 1,
        ("Observation", "censored_value", "valueQuantity.comparator"): 1,
        ("Observation", "unknown_unit", "valueQuantity.code"): 1,
        ("Observation", "unit_not_convertible", "valueQuantity.code"): 1,
        ("Observation", "out_of_range", "valueQuantity.value"): 1,
        ("Observation", "no_date", "effective[x]"): 1,
        ("Observation", "imprecise_date", "effective[x]"): 1,
    }
    assert report.features["glucose"].out_of_range == 1
    assert report.features["glucose"].missing == 1


def test_record_level_problems(tmp_path: Path) -> None:
    _, report, _ = run(tmp_path, [
        patient("p1"),
        patient("p1"),  # duplicate id
        {"resourceType": "Patient", "id": "p2", "birthDate": "1970-13-01"},
        observation("dup", "p1", "2345-7", 90.0, "mg/dL", day(-1)),
        observation("dup", "p1", "2345-7", 91.0, "mg/dL", day(-2)),
        observation("for-p2", "p2", "2345-7", 90.0, "mg/dL", day(-1)),
        observation("err", "p1", "2345-7", 90.0, "mg/dL", day(-1),
                    status="entered-in-error"),
        observation("group", "p1", "2345-7", 90.0, "mg/dL", day(-1),
                    subject={"reference": "Group/g1"}),
        observation("nobody", "p1", "2345-7", 90.0, "mg/dL", day(-1), subject={}),
        {**observation("extra", "p1", "2345-7", 90.0, "mg/dL", day(-1)),
         "context": {"reference": "Encounter/e1"}},
        {k: v for k, v in observation("nostatus", "p1", "2345-7", 1.0, "mg/dL",
                                       day(-1)).items() if k != "status"},
        condition("refuted", "p1", "I10", day(-1),
                  verificationStatus={"coding": [{"code": "refuted"}]}),
        encounter("nodate", "p1", None),
        {"resourceType": "Wibble", "id": "w"},
    ])
    assert rejections_of(report) == {
        ("Patient", "duplicate_id", "id"): 1,
        ("Patient", "invalid_date", "birthDate"): 1,
        ("Observation", "duplicate_id", "id"): 1,
        ("Observation", "patient_rejected", "subject"): 1,
        ("Observation", "excluded_status", "status"): 1,
        ("Observation", "subject_not_patient", "subject"): 1,
        ("Observation", "no_patient_reference", "subject"): 1,
        ("Observation", "unknown_element", "(root)"): 1,
        ("Observation", "missing_element", "status"): 1,
        ("Condition", "excluded_status", "verificationStatus"): 1,
        ("Encounter", "no_date", "period.start"): 1,
        ("(unknown)", "not_a_resource", "resourceType"): 1,
    }
    assert report.patients.read == 1
    assert report.patients.rejected == 2


def test_rejected_record_counted_once(tmp_path: Path) -> None:
    # Its patient is absent too, but the record is already rejected whole.
    _, report, _ = run(tmp_path, [
        observation("err", "ghost", "2345-7", 90.0, "mg/dL", day(-1),
                    status="entered-in-error"),
        observation("undated", "ghost", "2345-7", 90.0, "mg/dL", None),
        observation("value", "ghost", "2345-7", None, None, day(-1)),
    ])
    assert rejections_of(report) == {
        ("Observation", "excluded_status", "status"): 1,
        ("Observation", "no_date", "effective[x]"): 1,
        ("Observation", "no_value", "value[x]"): 1,
        ("Observation", "patient_not_found", "subject"): 1,
    }


def test_invalid_json_line_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    lines = [json.dumps(patient("p1")), "{not json", "[1, 2]",
             json.dumps(observation("o1", "p1", "2345-7", 90.0, "mg/dL", day(-1)))]
    (folder / "mixed.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, report = load_site_table(folder, make_spec(), site="test")
    assert rows.loc[0, "glucose"] == 90.0
    assert rejections_of(report) == {
        ("(undecoded)", "invalid_json", "(root)"): 1,
        ("(undecoded)", "not_a_resource", "(root)"): 1,
    }


def test_no_value_or_id_leaves_site(tmp_path: Path) -> None:
    secret_value = 123.456
    _, report, log = run(tmp_path, [
        patient("id-zq81", name=[{"family": "Zebedee"}]),
        observation("obs-xk42", "id-zq81", "2345-7", secret_value, "mg/dL",
                    "2025-02-30"),
        observation("obs-xk43", "id-zq81", "2345-7", secret_value, "furlong",
                    day(-1)),
        observation("obs-xk44", "id-nobody", "2345-7", secret_value, "mg/dL",
                    day(-1)),
    ])
    shared = report.to_json()
    for private in ("123.456", "Zebedee", "id-zq81", "obs-xk4", "id-nobody",
                    "2025-02-30", "furlong"):
        assert private not in shared

    with log.open(newline="", encoding="utf-8") as handle:
        logged = list(csv.DictReader(handle))
    assert {row["resource_id"] for row in logged} == {
        "Observation/obs-xk42", "Observation/obs-xk43", "Observation/obs-xk44"}
    text = log.read_text(encoding="utf-8")
    for value in ("123.456", "Zebedee", "2025-02-30", "furlong"):
        assert value not in text


def test_malformed_element_name_not_shared(tmp_path: Path) -> None:
    _, report, _ = run(tmp_path, [
        patient("p1"),
        {**observation("o1", "p1", "2345-7", 90.0, "mg/dL", day(-1)),
         "Jane Doe 1970-01-01": 1},
    ])
    assert "Jane" not in report.to_json()
    assert rejections_of(report) == {
        ("Observation", "unknown_element", "(root)"): 1}


def test_unknown_element_name_stays_in_local_log(tmp_path: Path) -> None:
    # A key that passes the element-name pattern is still free text.
    nested = patient("p2", name=[{"family": "Doe", "secretNote42": "x"}])
    _, report, log = run(tmp_path, [
        patient("p1", maryPoppinsMRN12345="x"), nested,
        {**observation("o1", "p1", "2345-7", 90.0, "mg/dL", day(-1)),
         "context": {"reference": "Encounter/e1"}},
    ])
    shared = report.to_json()
    assert "maryPoppins" not in shared and "secretNote42" not in shared
    assert rejections_of(report) == {
        ("Patient", "unknown_element", "(root)"): 1,
        ("Patient", "unknown_element", "name"): 1,
        ("Observation", "unknown_element", "(root)"): 1,
    }
    with log.open(newline="") as handle:
        elements = {row["resource_id"]: row["element"]
                    for row in csv.DictReader(handle)}
    assert elements == {"Patient/p1": "maryPoppinsMRN12345",
                        "Patient/p2": "name.secretNote42",
                        "Observation/o1": "context"}


def test_unresolved_patient_rows_name_file_and_line(tmp_path: Path) -> None:
    _, report, log = run(tmp_path, [
        patient("p1", birthDate="1970-02-30"),
        observation("orphan", "ghost", "2345-7", 99.0, "mg/dL", day(-1)),
        observation("of-rejected", "p1", "2345-7", 99.0, "mg/dL", day(-1)),
    ])
    with log.open(newline="") as handle:
        sources = {row["reason"]: row["source"] for row in csv.DictReader(handle)}
    assert sources == {"invalid_date": "export.ndjson line 1",
                       "patient_not_found": "export.ndjson line 2",
                       "patient_rejected": "export.ndjson line 3"}


def test_gender_code_not_recognised(tmp_path: Path) -> None:
    rows, report, _ = run(tmp_path, [patient("p1", gender="frau")])
    assert report.codes_not_recognised == {"Patient.gender": 1}
    assert rows["sex_male"].isna().tolist() == [True]


def test_local_code_system_counted(tmp_path: Path) -> None:
    local = {"coding": [{"system": "urn:oid:1.2.840.114350", "code": "GLU"}]}
    _, report, _ = run(tmp_path, [
        patient("p1"),
        {**observation("o1", "p1", "2345-7", 90.0, "mg/dL", day(-1)), "code": local},
        condition("c1", "p1", "38341003", day(-1), system="http://snomed.info/sct"),
    ])
    assert report.codes_not_recognised == {"Condition.code": 1, "Observation.code": 1}
