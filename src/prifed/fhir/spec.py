"""The feature specification shared by a federation, and its hash.

A specification declares, in clinical terms, how every site turns its FHIR
records into the same table: one row per patient at a fixed index date, one
column per feature and one label column. It is read from TOML or YAML and
validated with pydantic. The hash is taken over the validated content, so two
files that mean the same thing share one hash: comments, key order, TOML or
YAML, and defaults written out or left implicit do not matter. Any change of
meaning changes the hash.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from prifed.errors import ConfigError
from prifed.fhir import units

SNOMED_CT = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"

# Bumped when the meaning of a field changes, so that old and new readings of
# the same file cannot share a hash.
HASH_SCHEME = "prifed.fhir.spec/1"

_NAME = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
_LOINC_CODE = r"^[0-9]{1,7}-[0-9]$"
_RESERVED_COLUMNS = frozenset({"site"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Range(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check_range(self) -> _Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min must not exceed max; got {self.min} > {self.max}")
        return self


class AgeFeature(_Range):
    """Age in completed years at the index date."""

    kind: Literal["age"]
    name: str = Field(pattern=_NAME)
    min: float | None = 0.0
    max: float | None = 130.0


class SexFeature(_Strict):
    """Administrative sex from Patient.gender: male 1, female 0, else missing."""

    kind: Literal["sex"]
    name: str = Field(pattern=_NAME)


class ObservationFeature(_Range):
    """A numeric Observation with one LOINC code, in a window before the index."""

    kind: Literal["observation"]
    name: str = Field(pattern=_NAME)
    loinc: str = Field(pattern=_LOINC_CODE)
    unit: str
    window_days: int = Field(gt=0)
    aggregate: Literal["latest", "min", "max", "mean"] = "latest"

    @model_validator(mode="after")
    def _check_unit(self) -> ObservationFeature:
        units.check_target_unit(self.unit)
        return self


class ConditionFeature(_Strict):
    """1 when a Condition with one of the codes starts on or before the index."""

    kind: Literal["condition"]
    name: str = Field(pattern=_NAME)
    system: str = SNOMED_CT
    codes: list[str] = Field(min_length=1)
    window_days: int | None = Field(default=None, gt=0)


class EncounterCountFeature(_Strict):
    """Number of Encounters that start in a window before the index."""

    kind: Literal["encounter_count"]
    name: str = Field(pattern=_NAME)
    window_days: int = Field(gt=0)
    classes: list[str] = Field(default_factory=list)


Feature = Annotated[
    AgeFeature | SexFeature | ObservationFeature | ConditionFeature
    | EncounterCountFeature,
    Field(discriminator="kind"),
]


class ConditionLabel(_Strict):
    """1 when a Condition with one of the codes starts within the horizon."""

    kind: Literal["condition"]
    name: str = Field(pattern=_NAME)
    system: str = SNOMED_CT
    codes: list[str] = Field(min_length=1)
    horizon_days: int = Field(gt=0)
    exclude_prevalent: bool = True
    require_follow_up: bool = False


class ObservationLabel(_Strict):
    """1 when an Observation within the horizon meets the threshold, else 0."""

    kind: Literal["observation"]
    name: str = Field(pattern=_NAME)
    loinc: str = Field(pattern=_LOINC_CODE)
    unit: str
    threshold: float
    comparison: Literal[">=", ">", "<=", "<"] = ">="
    horizon_days: int = Field(gt=0)
    exclude_prevalent: bool = True
    require_follow_up: bool = False

    @model_validator(mode="after")
    def _check_unit(self) -> ObservationLabel:
        units.check_target_unit(self.unit)
        return self


Label = Annotated[ConditionLabel | ObservationLabel,
                  Field(discriminator="kind")]


class FeatureSpec(_Strict):
    """A versioned feature specification: index date, features and label."""

    name: str = Field(min_length=1, max_length=200)
    version: str = Field(min_length=1, max_length=50)
    description: str = ""
    index_date: date
    features: list[Feature] = Field(min_length=1)
    label: Label
    missing: Literal["drop", "keep"] = "drop"

    @model_validator(mode="after")
    def _check_columns(self) -> FeatureSpec:
        names = [feature.name for feature in self.features] + [self.label.name]
        seen: set[str] = set()
        for name in names:
            if name in _RESERVED_COLUMNS:
                raise ValueError(f"column name {name!r} is reserved for the site")
            if name in seen:
                raise ValueError(f"column name {name!r} is used twice")
            seen.add(name)
        return self

    @property
    def columns(self) -> list[str]:
        """Column names of the table: site, the features in order, the label."""
        return ["site", *(f.name for f in self.features), self.label.name]


def parse_spec(data: Mapping[str, Any], source: str = "spec") -> FeatureSpec:
    """Validate a decoded specification and raise ConfigError naming each field."""
    try:
        return FeatureSpec.model_validate(dict(data))
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "(top level)"
            problems.append(f"{where}: {item['msg']}")
        raise ConfigError(
            f"invalid feature specification {source}: " + "; ".join(problems)
        ) from None


def load_spec(path: str | Path) -> FeatureSpec:
    """Read a specification from a .toml, .yaml, .yml or .json file."""
    spec_path = Path(path)
    try:
        text = spec_path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"cannot read feature specification {spec_path}: {error.strerror}"
        ) from None

    suffix = spec_path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(
                "feature specification must end in .toml, .yaml, .yml or .json; "
                f"got {spec_path.name!r}"
            )
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"feature specification {spec_path} is not valid {suffix[1:]}: {error}"
        ) from None

    if not isinstance(data, dict):
        raise ConfigError(
            f"feature specification {spec_path} must be a table of settings"
        )
    return parse_spec(data, source=str(spec_path))


def canonical_json(spec: FeatureSpec) -> str:
    """Return the canonical JSON text that the hash is computed over."""
    payload = {"scheme": HASH_SCHEME, "spec": spec.model_dump(mode="json")}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)


def spec_hash(spec: FeatureSpec | str | Path) -> str:
    """Return the SHA-256 hex digest of a specification's validated content."""
    if not isinstance(spec, FeatureSpec):
        spec = load_spec(spec)
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()


def is_spec_hash(value: str) -> bool:
    """Tell whether a string has the form of a specification hash."""
    return re.fullmatch(r"[0-9a-f]{64}", value) is not None
