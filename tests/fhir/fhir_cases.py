"""Builders of small FHIR R4 resources and specifications for the FHIR tests."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from prifed.fhir.spec import FeatureSpec, parse_spec

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLES = Path(__file__).parents[2] / "examples" / "fhir"
INDEX = date(2025, 6, 30)
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"


def day(offset: int) -> str:
    """Return the ISO date ``offset`` days after the index date."""
    return (INDEX + timedelta(days=offset)).isoformat()


def patient(pid: str, gender: str = "female", birth: str | None = "1970-03-15",
            **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Patient", "id": pid, "gender": gender}
    if birth is not None:
        resource["birthDate"] = birth
    resource.update(extra)
    return resource


def quantity(value: float | None, code: str | None, unit: str | None = None,
             system: str | None = UCUM) -> dict[str, Any]:
    result: dict[str, Any] = {}
    if value is not None:
        result["value"] = value
    if code is not None:
        result["code"] = code
        if system is not None:
            result["system"] = system
    if unit is not None:
        result["unit"] = unit
    return result


def observation(oid: str, pid: str, loinc: str, value: float | None, code: str | None,
                when: str | None, **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation", "id": oid, "status": "final",
        "code": {"coding": [{"system": LOINC, "code": loinc}]},
        "subject": {"reference": f"Patient/{pid}"},
    }
    if when is not None:
        resource["effectiveDateTime"] = when
    if value is not None or code is not None:
        resource["valueQuantity"] = quantity(value, code)
    resource.update(extra)
    return resource


def blood_pressure(oid: str, pid: str, systolic: float, diastolic: float,
                   when: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": oid, "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "85354-9"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "component": [
            {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
             "valueQuantity": quantity(systolic, "mm[Hg]")},
            {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
             "valueQuantity": quantity(diastolic, "mm[Hg]")},
        ],
    }


def condition(cid: str, pid: str, code: str, onset: str | None,
              system: str = ICD10, **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Condition", "id": cid,
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
    }
    if onset is not None:
        resource["onsetDateTime"] = onset
    resource.update(extra)
    return resource


def encounter(eid: str, pid: str, start: str | None, klass: str = "AMB",
              status: str = "finished") -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Encounter", "id": eid, "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                  "code": klass},
        "subject": {"reference": f"Patient/{pid}"},
    }
    if start is not None:
        resource["period"] = {"start": start}
    return resource


def write_ndjson(folder: Path, resources: list[dict[str, Any]],
                 name: str = "export.ndjson") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in resources), encoding="utf-8")
    return folder


def spec_data(**overrides: Any) -> dict[str, Any]:
    """Return a specification with one feature of every kind, as decoded TOML."""
    data: dict[str, Any] = {
        "name": "test-spec",
        "version": "1",
        "index_date": INDEX,
        "missing": "keep",
        "features": [
            {"kind": "age", "name": "age"},
            {"kind": "sex", "name": "sex_male"},
            {"kind": "observation", "name": "glucose", "loinc": "2345-7",
             "unit": "mg/dL", "window_days": 365, "min": 10, "max": 1500},
            {"kind": "observation", "name": "systolic_bp", "loinc": "8480-6",
             "unit": "mm[Hg]", "window_days": 365},
            {"kind": "observation", "name": "weight", "loinc": "29463-7",
             "unit": "kg", "window_days": 365},
            {"kind": "condition", "name": "hypertension", "system": ICD10,
             "codes": ["I10"]},
            {"kind": "encounter_count", "name": "visits", "window_days": 365,
             "classes": ["AMB"]},
        ],
        "label": {"kind": "condition", "name": "outcome", "system": ICD10,
                  "codes": ["E11.9"], "horizon_days": 365},
    }
    data.update(overrides)
    return data


def make_spec(**overrides: Any) -> FeatureSpec:
    return parse_spec(spec_data(**overrides))
