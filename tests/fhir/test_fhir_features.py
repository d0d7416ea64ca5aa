"""Feature values, windows, exclusions and labels on hand-built records."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from fhir_cases import (
    blood_pressure,
    condition,
    day,
    encounter,
    make_spec,
    observation,
    patient,
    spec_data,
    write_ndjson,
)
from prifed.fhir import load_site_table
from prifed.fhir.spec import parse_spec


def table_of(tmp_path: Path, resources: list[dict[str, Any]], **spec: Any
             ) -> tuple[pd.DataFrame, Any]:
    folder = write_ndjson(tmp_path / "export", resources)
    return load_site_table(folder, make_spec(**spec), site="test")


def test_latest_value_in_window(tmp_path: Path) -> None:
    rows, report = table_of(tmp_path, [
        patient("p1"),
        observation("o1", "p1", "2345-7", 90.0, "mg/dL", day(-400)),
        observation("o2", "p1", "2345-7", 95.0, "mg/dL", day(-100)),
        observation("o3", "p1", "2345-7", 101.0, "mg/dL", day(-10)),
        observation("o4", "p1", "2345-7", 140.0, "mg/dL", day(5)),
    ])
    assert rows.loc[0, "glucose"] == 101.0
    assert report.features["glucose"].present == 1


def test_window_bounds(tmp_path: Path) -> None:
    # The window is (index - 365 days, index]: day -365 is out, day 0 is in.
    rows, _ = table_of(tmp_path, [
        patient("p1"),
        observation("o1", "p1", "2345-7", 80.0, "mg/dL", day(-365)),
        patient("p2"),
        observation("o2", "p2", "2345-7", 81.0, "mg/dL", day(-364)),
        patient("p3"),
        observation("o3", "p3", "2345-7", 82.0, "mg/dL", day(0)),
        patient("p4"),
        observation("o4", "p4", "2345-7", 83.0, "mg/dL", day(1)),
    ])
    glucose = dict(zip(["p1", "p2", "p3", "p4"], rows["glucose"], strict=True))
    assert math.isnan(glucose["p1"])
    assert glucose["p2"] == 81.0
    assert glucose["p3"] == 82.0
    assert math.isnan(glucose["p4"])


def test_latest_uses_time_of_day(tmp_path: Path) -> None:
    rows, _ = table_of(tmp_path, [
        patient("p1"),
        observation("o-late", "p1", "2345-7", 99.0, "mg/dL", day(-3) + "T18:00:00Z"),
        observation("o-early", "p1", "2345-7", 88.0, "mg/dL", day(-3) + "T08:00:00Z"),
    ])
    assert rows.loc[0, "glucose"] == 99.0


@pytest.mark.parametrize("aggregate, expected", [
    ("min", 90.0), ("max", 120.0), ("mean", (90.0 + 120.0 + 105.0) / 3),
    ("latest", 105.0),
])
def test_aggregates(tmp_path: Path, aggregate: str, expected: float) -> None:
    data = spec_data()
    data["features"][2]["aggregate"] = aggregate
    folder = write_ndjson(tmp_path / "export", [
        patient("p1"),
        observation("o1", "p1", "2345-7", 90.0, "mg/dL", day(-30)),
        observation("o2", "p1", "2345-7", 120.0, "mg/dL", day(-20)),
        observation("o3", "p1", "2345-7", 105.0, "mg/dL", day(-10)),
    ])
    rows, _ = load_site_table(folder, parse_spec(data), site="test")
    assert rows.loc[0, "glucose"] == pytest.approx(expected)


def test_blood_pressure_component(tmp_path: Path) -> None:
    rows, _ = table_of(tmp_path, [
        patient("p1"), blood_pressure("bp1", "p1", 142.0, 91.0, day(-5)),
    ])
    assert rows.loc[0, "systolic_bp"] == 142.0


def test_units_converted(tmp_path: Path) -> None:
    rows, report = table_of(tmp_path, [
        patient("p1"),
        observation("o1", "p1", "2345-7", 5.5, "mmol/L", day(-5)),
        observation("o2", "p1", "29463-7", 150.0, "[lb_av]", day(-5)),
    ])
    assert rows.loc[0, "glucose"] == pytest.approx(5.5 * 18.016, rel=2e-3)
    assert rows.loc[0, "weight"] == pytest.approx(150.0 * 0.45359237, rel=1e-12)
    assert report.features["glucose"].unit_converted == 1
    assert report.features["weight"].unit_converted == 1


def test_age_and_sex(tmp_path: Path) -> None:
    rows, _ = table_of(tmp_path, [
        patient("a", "male", "1975-06-30"),  # 50th birthday on the index date
        patient("b", "female", "1975-07-01"),  # turns 50 the day after
        patient("c", "other", "1980-02"),  # partial date, age 45 either way
        patient("d", "unknown", "1975"),  # 49 or 50 by birthday: ambiguous
        patient("e", "female", None),
    ])
    assert rows["age"].tolist()[:3] == [50, 49, 45]
    assert rows["age"].isna().tolist() == [False, False, False, True, True]
    assert rows["sex_male"].tolist()[:2] == [1, 0]
    assert rows["sex_male"].isna().tolist() == [False, False, True, True, False]


def test_condition_presence(tmp_path: Path) -> None:
    rows, _ = table_of(tmp_path, [
        patient("p1"), condition("c1", "p1", "I10", "2010-04-01"),
        patient("p2"), condition("c2", "p2", "I10", day(30)),
        patient("p3"),
        condition("c3", "p3", "I10", None, recordedDate=day(-2)),
        patient("p4"),
        {**condition("c4", "p4", "I10", None),
         "code": {"coding": [{"system": "urn:oid:2.16.840.1.113883.6.90",
                              "code": "I10"}]},
         "onsetDateTime": day(-1)},
    ])
    assert rows["hypertension"].tolist() == [1, 0, 1, 1]


def test_condition_window(tmp_path: Path) -> None:
    data = spec_data()
    data["features"][5]["window_days"] = 365
    folder = write_ndjson(tmp_path / "export", [
        patient("p1"), condition("c1", "p1", "I10", day(-400)),
        patient("p2"), condition("c2", "p2", "I10", day(-300)),
    ])
    rows, _ = load_site_table(folder, parse_spec(data), site="test")
    assert rows["hypertension"].tolist() == [0, 1]


def test_encounter_count(tmp_path: Path) -> None:
    rows, report = table_of(tmp_path, [
        patient("p1"),
        encounter("e1", "p1", day(-10)),
        encounter("e2", "p1", day(-200) + "T10:00:00Z"),
        encounter("e3", "p1", day(-400)),  # before the window
        encounter("e4", "p1", day(-20), klass="EMER"),  # other class
        encounter("e5", "p1", day(-30), status="cancelled"),
        encounter("e6", "p1", day(3)),  # after the index date
    ])
    assert rows.loc[0, "visits"] == 2
    assert report.features["visits"].nonzero == 1


def test_condition_label(tmp_path: Path) -> None:
    rows, report = table_of(tmp_path, [
        patient("p1"), condition("c1", "p1", "E11.9", day(200)),
        patient("p2"),
        patient("p3"), condition("c3", "p3", "E11.9", day(366)),  # past horizon
        patient("p4"), condition("c4", "p4", "E11.9", day(-30)),  # prevalent
    ])
    assert rows["outcome"].tolist() == [1, 0, 0]
    assert report.patients.excluded == {"prevalent_label": 1}
    assert report.label.positive == 1
    assert report.label.negative == 2


def test_prevalent_kept_when_allowed(tmp_path: Path) -> None:
    data = spec_data()
    data["label"]["exclude_prevalent"] = False
    folder = write_ndjson(tmp_path / "export", [
        patient("p1"), condition("c1", "p1", "E11.9", day(-30)),
    ])
    rows, report = load_site_table(folder, parse_spec(data), site="test")
    assert rows["outcome"].tolist() == [0]
    assert report.patients.excluded == {}


def test_follow_up_required(tmp_path: Path) -> None:
    data = spec_data()
    data["label"]["require_follow_up"] = True
    folder = write_ndjson(tmp_path / "export", [
        patient("p1"), encounter("e1", "p1", day(100)),
        patient("p2"), encounter("e2", "p2", day(-100)),
    ])
    rows, report = load_site_table(folder, parse_spec(data), site="test")
    assert len(rows) == 1
    assert report.patients.excluded == {"no_follow_up": 1}


def test_observation_label(tmp_path: Path) -> None:
    data = spec_data()
    data["label"] = {"kind": "observation", "name": "outcome", "loinc": "4548-4",
                     "unit": "%", "threshold": 6.5, "comparison": ">=",
                     "horizon_days": 365}
    folder = write_ndjson(tmp_path / "export", [
        patient("p1"), observation("h1", "p1", "4548-4", 6.8, "%", day(100)),
        patient("p2"), observation("h2", "p2", "4548-4", 5.4, "%", day(100)),
        patient("p3"),  # no HbA1c in the horizon
        patient("p4"), observation("h4", "p4", "4548-4", 7.1, "%", day(-100)),
        observation("h5", "p4", "4548-4", 7.3, "%", day(100)),
        patient("p5"), observation("h6", "p5", "4548-4", 50.0, "mmol/mol", day(10)),
    ])
    rows, report = load_site_table(folder, parse_spec(data), site="test")
    assert rows["outcome"].tolist() == [1, 0, 1]
    assert report.patients.excluded == {"label_missing": 1, "prevalent_label": 1}


def test_deceased_and_unborn_excluded(tmp_path: Path) -> None:
    rows, report = table_of(tmp_path, [
        patient("p1", deceasedDateTime=day(-1)),
        patient("p2", deceasedDateTime=day(10)),
        patient("p3", deceasedBoolean=True),
        patient("p4", birth=day(5)),
    ])
    assert len(rows) == 1
    assert report.patients.excluded == {
        "born_after_index": 1, "deceased_before_index": 1,
        "deceased_date_unknown": 1,
    }


def test_incomplete_rows_dropped(tmp_path: Path) -> None:
    rows, report = table_of(tmp_path, [
        patient("p1", "male"), patient("p2", "unknown"),
    ], missing="drop")
    assert len(rows) == 0
    assert report.patients.excluded == {"incomplete_features": 2}
    assert report.patients.eligible == 2
    assert report.features["glucose"].missing == 2


def test_row_order_follows_patient_key(tmp_path: Path) -> None:
    # Facts arrive before their patients; rows still come out sorted by key.
    rows, _ = table_of(tmp_path, [
        observation("o2", "b", "2345-7", 120.0, "mg/dL", day(-1)),
        observation("o1", "a", "2345-7", 90.0, "mg/dL", day(-1)),
        patient("b", "male"),
        patient("a", "female"),
    ])
    assert rows["glucose"].tolist() == [90.0, 120.0]
    assert rows["sex_male"].tolist() == [0, 1]
    assert rows["site"].tolist() == ["test", "test"]
