"""Feature specifications: loading, validation errors and the hash."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from fhir_cases import EXAMPLES, make_spec, spec_data
from prifed.errors import ConfigError
from prifed.fhir.spec import load_spec, parse_spec, spec_hash

TOML_SPEC = """
# comment lines do not change the hash
name = "test-spec"
version = "1"
index_date = 2025-06-30
missing = "keep"

[[features]]
kind = "age"
name = "age"

[[features]]
kind = "sex"
name = "sex_male"

[[features]]
kind = "observation"
name = "glucose"
loinc = "2345-7"
unit = "mg/dL"
window_days = 365
min = 10
max = 1500

[[features]]
kind = "observation"
name = "systolic_bp"
loinc = "8480-6"
unit = "mm[Hg]"
window_days = 365

[[features]]
kind = "observation"
name = "weight"
loinc = "29463-7"
unit = "kg"
window_days = 365

[[features]]
kind = "condition"
name = "hypertension"
system = "http://hl7.org/fhir/sid/icd-10-cm"
codes = ["I10"]

[[features]]
kind = "encounter_count"
name = "visits"
window_days = 365
classes = ["AMB"]

[label]
kind = "condition"
name = "outcome"
system = "http://hl7.org/fhir/sid/icd-10-cm"
codes = ["E11.9"]
horizon_days = 365
"""


def test_toml_and_yaml_share_hash(tmp_path: Path) -> None:
    toml_path = tmp_path / "spec.toml"
    toml_path.write_text(TOML_SPEC, encoding="utf-8")
    yaml_path = tmp_path / "spec.yaml"
    data = spec_data()
    data["index_date"] = "2025-06-30"
    yaml_path.write_text(yaml.safe_dump(data), encoding="utf-8")

    assert load_spec(toml_path) == load_spec(yaml_path)
    assert spec_hash(toml_path) == spec_hash(yaml_path)
    assert spec_hash(toml_path) == spec_hash(make_spec())


def test_hash_is_sha256_of_canonical_json() -> None:
    spec = make_spec()
    payload = {"scheme": "prifed.fhir.spec/1", "spec": spec.model_dump(mode="json")}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert spec_hash(spec) == hashlib.sha256(text.encode()).hexdigest()


def test_written_defaults_keep_hash() -> None:
    explicit = spec_data()
    explicit["features"][2]["aggregate"] = "latest"
    explicit["label"]["exclude_prevalent"] = True
    explicit["label"]["require_follow_up"] = False
    explicit["description"] = ""
    assert spec_hash(parse_spec(explicit)) == spec_hash(make_spec())


@pytest.mark.parametrize("change", [
    ("index_date", "2025-07-01"),
    ("version", "2"),
    ("missing", "drop"),
])
def test_changed_meaning_changes_hash(change: tuple[str, str]) -> None:
    key, value = change
    assert spec_hash(make_spec(**{key: value})) != spec_hash(make_spec())


def test_changed_window_changes_hash() -> None:
    data = spec_data()
    data["features"][2]["window_days"] = 364
    assert spec_hash(parse_spec(data)) != spec_hash(make_spec())


def test_example_spec_loads() -> None:
    spec = load_spec(EXAMPLES / "spec.toml")
    assert spec.columns[0] == "site"
    assert spec.columns[-1] == "t2d_1y"
    assert len(spec.columns) == len(spec.features) + 2


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["features"].append({"kind": "age", "name": "age"}), "used twice"),
    (lambda d: d["features"].append({"kind": "sex", "name": "site"}), "reserved"),
    (lambda d: d["features"][2].update(unit="mg/dl/x"), "features.2.observation"),
    (lambda d: d["features"][2].update(loinc="2345"), "features.2.observation.loinc"),
    (lambda d: d["features"][2].update(min=5, max=1), "min must not exceed max"),
    (lambda d: d["features"][2].update(window_days=0), "window_days"),
    (lambda d: d["features"][0].update(kind="height"), "features.0"),
    (lambda d: d.update(colour="blue"), "colour"),
    (lambda d: d.pop("label"), "label"),
    (lambda d: d["label"].update(codes=[]), "label.condition.codes"),
    (lambda d: d.update(features=[]), "features"),
])
def test_invalid_spec_names_field(edit, field: str) -> None:
    data = spec_data()
    edit(data)
    with pytest.raises(ConfigError) as raised:
        parse_spec(data)
    assert field in str(raised.value)


def test_unknown_unit_lists_supported() -> None:
    data = spec_data()
    data["features"][2]["unit"] = "furlong"
    with pytest.raises(ConfigError) as raised:
        parse_spec(data)
    assert "'furlong' is not a supported UCUM code" in str(raised.value)
    assert "mg/dL" in str(raised.value)


def test_spec_file_suffix_checked(tmp_path: Path) -> None:
    path = tmp_path / "spec.txt"
    path.write_text(TOML_SPEC, encoding="utf-8")
    with pytest.raises(ConfigError, match="must end in .toml"):
        load_spec(path)


def test_invalid_toml_reported(tmp_path: Path) -> None:
    path = tmp_path / "spec.toml"
    path.write_text("name = [", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid toml"):
        load_spec(path)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read feature specification"):
        load_spec(tmp_path / "absent.toml")
