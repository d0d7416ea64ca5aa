"""Generate the three example FHIR sites with carebundle 0.5.0 (run once).

PriFed does not need carebundle to run: the output of this script is shipped
under examples/fhir/. To regenerate it, install carebundle into a virtual
environment (``pip install carebundle==0.5.0``) and run
``python examples/fhir/generate.py``. The output is the same bytes every time.

carebundle records one ambulatory visit per patient with every Condition
dated before it. To give the example a prediction target after the index
date, this script builds each patient's record as follows (a construction for
exercising the pipeline, not a clinical model):

* the carebundle visit is the baseline visit, before the index date;
* 0 to 4 earlier ambulatory Encounters, more for patients with more
  conditions, so that the encounter count varies;
* with probability 0.9, a follow-up Encounter 120 to 300 days after the
  index date. Type 2 diabetes Conditions (ICD-10-CM E11.*) are moved to that
  follow-up, as if first diagnosed there. Patients without a follow-up lose
  them.

The sites differ in population (carebundle profile mix, age range, seed) and
in format: north and south write one gzip-compressed transaction Bundle per
patient; east writes a bulk export (one NDJSON file per resource type, ids
minted from fullUrl and references rewritten to ``Type/id``), reports lipids,
glucose and creatinine in SI units, weight in pounds, height in inches,
temperature in Fahrenheit and blood pressure as display-only "mmHg", and
carries defects: carebundle's injected ones plus a few written here (an
invalid date, a Quantity with no unit, a reference to a missing patient).
"""

from __future__ import annotations

import copy
import gzip
import json
import shutil
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from carebundle import Imperfection, generate_cohort, inject_defects, to_json

HERE = Path(__file__).resolve().parent
INDEX_DATE = date(2025, 6, 30)
NAMESPACE = uuid.UUID("6b1f3c9e-2d4a-5e8b-9c7d-1a2b3c4d5e6f")
UCUM = "http://unitsofmeasure.org"

SITES: dict[str, dict[str, Any]] = {
    "north": {
        "seed": 101, "count": 120, "age_range": (35, 65), "visit": date(2025, 3, 3),
        "prevalence": {"healthy": 0.55, "hypertension": 0.25,
                       "type2_diabetes": 0.15, "ckd_stage3": 0.05},
    },
    "south": {
        "seed": 202, "count": 120, "age_range": (45, 70), "visit": date(2025, 5, 5),
        "prevalence": {"healthy": 0.3, "hypertension": 0.3,
                       "type2_diabetes": 0.3, "ckd_stage3": 0.1},
    },
    "east": {
        "seed": 303, "count": 120, "age_range": (50, 80), "visit": date(2025, 4, 7),
        "prevalence": {"healthy": 0.35, "hypertension": 0.3,
                       "type2_diabetes": 0.2, "ckd_stage3": 0.15},
    },
}

# Conventional clinical factors, written out here independently of
# prifed.fhir.units so that the example checks the conversion code.
SI_UNITS = {
    "2093-3": ("mmol/L", lambda v: v / 38.67),  # cholesterol
    "2085-9": ("mmol/L", lambda v: v / 38.67),  # HDL
    "13457-7": ("mmol/L", lambda v: v / 38.67),  # LDL
    "2571-8": ("mmol/L", lambda v: v / 88.57),  # triglycerides
    "2345-7": ("mmol/L", lambda v: v / 18.016),  # glucose
    "2160-0": ("umol/L", lambda v: v * 88.42),  # creatinine
    "29463-7": ("[lb_av]", lambda v: v / 0.45359237),  # body weight
    "8302-2": ("[in_i]", lambda v: v / 2.54),  # body height
    "8310-5": ("[degF]", lambda v: v * 9 / 5 + 32),  # body temperature
}


def _uuid(*parts: object) -> str:
    return str(uuid.uuid5(NAMESPACE, "/".join(map(str, parts))))


def _strip_narrative(bundle: dict[str, Any]) -> None:
    for entry in bundle["entry"]:
        entry["resource"].pop("text", None)


def _build_patient(bundle: dict[str, Any], site: str, index: int,
                   rng: np.random.Generator) -> dict[str, Any]:
    entries = bundle["entry"]
    patient_url = entries[0]["fullUrl"]
    baseline = next(e for e in entries if e["resource"]["resourceType"] == "Encounter")
    conditions = [e for e in entries if e["resource"]["resourceType"] == "Condition"]

    prior_visits = int(min(4, rng.poisson(0.5 + 0.6 * len(conditions))))
    visit_day = date.fromisoformat(baseline["resource"]["period"]["start"][:10])
    for number in range(prior_visits):
        day = visit_day - timedelta(days=int(rng.integers(30, 700)))
        entries.append(_encounter(baseline, _uuid(site, index, "prior", number), day))

    follow_up = rng.random() < 0.9
    follow_day = INDEX_DATE + timedelta(days=int(rng.integers(120, 301)))
    follow_url = None
    if follow_up:
        follow = _encounter(baseline, _uuid(site, index, "follow-up"), follow_day)
        follow_url = follow["fullUrl"]
        entries.append(follow)

    kept = []
    for entry in entries:
        resource = entry["resource"]
        is_diabetes = (resource["resourceType"] == "Condition"
                       and resource["code"]["coding"][0]["code"].startswith("E11"))
        if not is_diabetes:
            kept.append(entry)
        elif follow_url is not None:
            resource["onsetDateTime"] = follow_day.isoformat()
            resource["recordedDate"] = follow_day.isoformat()
            resource["encounter"] = {"reference": follow_url}
            kept.append(entry)
    bundle["entry"] = kept
    assert kept[0]["fullUrl"] == patient_url
    return bundle


def _encounter(template: dict[str, Any], new_id: str, day: date) -> dict[str, Any]:
    entry = copy.deepcopy(template)
    entry["fullUrl"] = f"urn:uuid:{new_id}"
    entry["resource"]["period"] = {"start": f"{day.isoformat()}T09:00:00Z",
                                   "end": f"{day.isoformat()}T09:30:00Z"}
    return entry


def _to_si(bundle: dict[str, Any]) -> None:
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] != "Observation":
            continue
        code = resource["code"]["coding"][0]["code"]
        quantity = resource.get("valueQuantity")
        if code in SI_UNITS and quantity is not None:
            unit, convert = SI_UNITS[code]
            quantity["value"] = round(convert(float(quantity["value"])), 2)
            quantity["unit"] = unit
            quantity["code"] = unit
            quantity["system"] = UCUM
        for component in resource.get("component", []):
            part = component.get("valueQuantity")
            if part is not None and part.get("code") == "mm[Hg]":
                component["valueQuantity"] = {"value": part["value"], "unit": "mmHg"}


def _to_ndjson(bundles: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Mint ids from fullUrl and rewrite urn:uuid references to Type/id."""
    streams: dict[str, list[str]] = {}
    for bundle in bundles:
        targets = {
            e["fullUrl"]: f"{e['resource']['resourceType']}/"
                          f"{e['fullUrl'].removeprefix('urn:uuid:')}"
            for e in bundle["entry"]
        }
        for entry in bundle["entry"]:
            text = json.dumps(entry["resource"], separators=(",", ":"), sort_keys=True)
            for urn, target in targets.items():
                text = text.replace(f'"{urn}"', f'"{target}"')
            resource = json.loads(text)
            resource["id"] = entry["fullUrl"].removeprefix("urn:uuid:")
            streams.setdefault(resource["resourceType"], []).append(
                json.dumps(resource, separators=(",", ":"), sort_keys=True))
    return streams


def _hand_defects(streams: dict[str, list[str]]) -> None:
    """Add the three defects PriFed must reject one by one."""
    observations = [json.loads(line) for line in streams["Observation"]]
    hdl = [o for o in observations if o["code"]["coding"][0]["code"] == "2085-9"]
    hdl[0]["effectiveDateTime"] = "2025-02-30"
    hdl[1]["valueQuantity"] = {"value": hdl[1]["valueQuantity"]["value"]}
    orphan = copy.deepcopy(hdl[2])
    orphan["id"] = _uuid("east", "orphan")
    orphan["subject"] = {"reference": f"Patient/{_uuid('east', 'no-such-patient')}"}
    observations.append(orphan)
    streams["Observation"] = [json.dumps(o, separators=(",", ":"), sort_keys=True)
                              for o in observations]


def _write_gzip(path: Path, text: str) -> None:
    # mtime=0 and no file name in the header keep the bytes reproducible.
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb",
                                               filename="", mtime=0) as handle:
        handle.write(text.encode("utf-8"))


def generate_site(site: str, settings: dict[str, Any]) -> None:
    """Write one site's folder."""
    folder = HERE / site
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(settings["seed"])
    cohort = generate_cohort(
        count=settings["count"], seed=settings["seed"],
        prevalence=settings["prevalence"], age_range=settings["age_range"],
        reference_date=settings["visit"], panels=("cmp", "lipid", "hba1c"),
    )
    bundles = []
    for index, generated in enumerate(cohort):
        bundle = json.loads(to_json(generated))
        if site == "east":
            bundle, _ = inject_defects(
                bundle, Imperfection(missing_field=0.004, unparseable_value=0.004,
                                     unknown_code_system=0.004,
                                     out_of_order_timestamp=0.004),
                seed=settings["seed"] * 1000 + index)
        _strip_narrative(bundle)
        bundles.append(_build_patient(bundle, site, index, rng))

    if site == "east":
        for bundle in bundles:
            _to_si(bundle)
        streams = _to_ndjson(bundles)
        _hand_defects(streams)
        for resource_type, lines in sorted(streams.items()):
            _write_gzip(folder / f"{resource_type}.ndjson.gz", "\n".join(lines) + "\n")
        return

    for index, bundle in enumerate(bundles):
        text = json.dumps(bundle, separators=(",", ":"))
        _write_gzip(folder / f"patient-{index:03d}.json.gz", text)


def main() -> None:
    """Write every site."""
    for site, settings in SITES.items():
        generate_site(site, settings)
        files = list((HERE / site).iterdir())
        size = sum(path.stat().st_size for path in files)
        print(f"{site}: {len(files)} files, {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
