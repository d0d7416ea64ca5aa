"""Synthea and carebundle exports against an independent reading of their JSON."""

from __future__ import annotations

import gzip
import json
import shutil
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fhir_cases import EXAMPLES, FIXTURES
from prifed.fhir import load_site_table, load_spec, merge_reports
from prifed.fhir.spec import parse_spec

SYNTHEA_INDEX = date(2016, 1, 1)
SITES = ("north", "south", "east")


@pytest.fixture(scope="module")
def example_sites() -> dict[str, Any]:
    """Import each example site once for the tests of this module."""
    spec = load_spec(EXAMPLES / "spec.toml")
    return {site: load_site_table(EXAMPLES / site, spec, site=site) for site in SITES}


def synthea_spec() -> Any:
    return parse_spec({
        "name": "synthea", "version": "1", "index_date": SYNTHEA_INDEX,
        "features": [
            {"kind": "age", "name": "age"},
            {"kind": "observation", "name": "bmi", "loinc": "39156-5",
             "unit": "kg/m2", "window_days": 730},
            {"kind": "observation", "name": "sbp", "loinc": "8480-6",
             "unit": "mm[Hg]", "window_days": 730},
            {"kind": "observation", "name": "weight_lb", "loinc": "29463-7",
             "unit": "[lb_av]", "window_days": 730},
            {"kind": "condition", "name": "prediabetes", "codes": ["15777000"]},
            {"kind": "encounter_count", "name": "visits", "window_days": 730},
        ],
        "label": {"kind": "condition", "name": "fracture", "codes": ["58150001"],
                  "horizon_days": 730},
    })


def synthea_entries() -> list[dict[str, Any]]:
    raw = gzip.decompress((FIXTURES / "synthea" / "afhir.json.gz").read_bytes())
    return [entry["resource"] for entry in json.loads(raw)["entry"]]


def in_window(when: str, days: int) -> bool:
    on = datetime.fromisoformat(when).date()
    return SYNTHEA_INDEX - timedelta(days=days) < on <= SYNTHEA_INDEX


def latest(resources: list[dict[str, Any]], loinc: str, days: int,
           component: bool = False) -> float:
    found = []
    for r in resources:
        if r["resourceType"] != "Observation" or not in_window(r["effectiveDateTime"],
                                                               days):
            continue
        parts = r.get("component", []) if component else [r]
        for part in parts:
            if part["code"]["coding"][0]["code"] == loinc:
                found.append((r["effectiveDateTime"], part["valueQuantity"]["value"]))
    return max(found)[1]


def test_synthea_bundle_features(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "synthea" / "afhir.json.gz", tmp_path)
    rows, report = load_site_table(tmp_path, synthea_spec(), site="synthea")
    resources = synthea_entries()
    row = rows.iloc[0]

    # Born 1945-12-10: 70 completed years on 2016-01-01.
    assert row["age"] == 70
    assert row["bmi"] == latest(resources, "39156-5", 730)
    assert row["sbp"] == latest(resources, "8480-6", 730, component=True)
    assert row["weight_lb"] == pytest.approx(
        latest(resources, "29463-7", 730) / 0.45359237, rel=1e-12)
    visits = sum(1 for r in resources if r["resourceType"] == "Encounter"
                 and in_window(r["period"]["start"], 730))
    assert row["visits"] == visits
    assert row["prediabetes"] == 1
    assert row["fracture"] == 1  # clavicle fracture on 2016-05-21
    assert report.rejections == []
    counts: dict[str, int] = {}
    for r in resources:
        counts[r["resourceType"]] = counts.get(r["resourceType"], 0) + 1
    assert report.resources_read == dict(sorted(counts.items()))


def test_synthea_patients_read(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "synthea" / "Patient.ndjson.gz", tmp_path)
    spec = synthea_spec()
    rows, report = load_site_table(tmp_path, spec, site="synthea")
    raw = gzip.decompress((FIXTURES / "synthea" / "Patient.ndjson.gz").read_bytes())
    patients = [json.loads(line) for line in raw.splitlines() if line.strip()]
    dead = sum(1 for p in patients if p.get("deceasedDateTime", "9999")[:10]
               <= SYNTHEA_INDEX.isoformat())
    unborn = sum(1 for p in patients if p["birthDate"] > SYNTHEA_INDEX.isoformat())
    assert report.patients.read == 25
    excluded = report.patients.excluded
    assert excluded.get("deceased_before_index", 0) == dead
    assert excluded.get("born_after_index", 0) == unborn
    # No observations in this file, so every remaining patient is incomplete.
    assert excluded["incomplete_features"] == 25 - dead - unborn
    assert len(rows) == 0


def bundles_to_ndjson(folder: Path, target: Path) -> None:
    """Convert transaction bundles to bulk NDJSON: ids from fullUrl, Type/id refs."""
    target.mkdir()
    streams: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.json")):
        entries = json.loads(path.read_text())["entry"]
        urls = {e["fullUrl"]: f"{e['resource']['resourceType']}/"
                              f"{e['fullUrl'].split(':')[-1]}" for e in entries}
        for entry in entries:
            text = json.dumps(entry["resource"])
            for url, ref in urls.items():
                text = text.replace(f'"{url}"', f'"{ref}"')
            resource = json.loads(text)
            resource["id"] = entry["fullUrl"].split(":")[-1]
            stream = streams.setdefault(resource["resourceType"], [])
            stream.append(json.dumps(resource))
    for resource_type, lines in streams.items():
        (target / f"{resource_type}.ndjson").write_text("\n".join(lines) + "\n")


def test_bundles_and_ndjson_agree(tmp_path: Path) -> None:
    spec = load_spec(EXAMPLES / "spec.toml")
    source = FIXTURES / "carebundle"
    bundles, bundle_report = load_site_table(source, spec, site="north")
    bundles_to_ndjson(source, tmp_path / "bulk")
    bulk, bulk_report = load_site_table(tmp_path / "bulk", spec, site="north")

    # Both key patients by their uuid, so rows come out in the same order.
    assert bundles.equals(bulk)
    assert bundle_report.features == bulk_report.features
    assert bundle_report.patients == bulk_report.patients
    assert bulk_report.patients.read == 4


def expected_labels(folder: Path, spec: Any) -> list[int]:
    """Read the example bundles directly: the label of each patient kept."""
    index = spec.index_date
    horizon = index + timedelta(days=spec.label.horizon_days)
    rows = []
    for path in sorted(folder.glob("*.json.gz")):
        entries = json.loads(gzip.decompress(path.read_bytes()))["entry"]
        resources = [e["resource"] for e in entries]
        follow_up = any(
            r["resourceType"] == "Encounter"
            and index < date.fromisoformat(r["period"]["start"][:10]) <= horizon
            for r in resources)
        if not follow_up:
            continue
        diabetes = any(r["resourceType"] == "Condition"
                       and r["code"]["coding"][0]["code"] in spec.label.codes
                       for r in resources)
        key = entries[0]["fullUrl"]
        rows.append((key, int(diabetes)))
    return [label for _, label in sorted(rows)]


@pytest.mark.parametrize("site", ["north", "south"])
def test_example_labels(site: str, example_sites: dict[str, Any]) -> None:
    spec = load_spec(EXAMPLES / "spec.toml")
    rows, report = example_sites[site]
    assert rows["t2d_1y"].tolist() == expected_labels(EXAMPLES / site, spec)
    assert report.patients.read == 120
    assert report.rejections == []


def test_example_east_defects(example_sites: dict[str, Any]) -> None:
    rows, report = example_sites["east"]
    reasons = report.rejections_by_reason()
    assert reasons["invalid_date"] == 1
    assert reasons["no_unit"] == 1
    assert reasons["patient_not_found"] == 1
    assert reasons["value_not_quantity"] >= 1
    assert report.features["hdl"].unit_converted > 0
    assert report.features["weight_kg"].unit_converted > 0
    assert report.features["systolic_bp"].unit_converted == 0
    # HDL arrives in mmol/L at east and is converted back to mg/dL.
    assert 20 < rows["hdl"].median() < 90
    assert len(rows) == report.patients.in_table


def test_three_site_federation(example_sites: dict[str, Any]) -> None:
    reports = [example_sites[site][1] for site in SITES]
    federation = merge_reports(reports)
    assert federation.sites == ["north", "south", "east"]
    total = federation.rows()[-1]
    assert total["rows"] == sum(r.patients.in_table for r in reports)
    assert total["positive"] == sum(r.label.positive for r in reports)
    assert all("site east" in text for text in federation.warnings)
