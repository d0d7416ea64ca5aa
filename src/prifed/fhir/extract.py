"""First pass: validate each resource with fhir.resources and keep its facts.

Patient, Observation, Condition and Encounter resources are validated with
the R4B models of fhir.resources (R4B reads R4 data). Every other resource
type is counted and skipped. A valid resource is reduced to the facts the
specification needs, each placed against the index date, and stored. A record
that cannot be used is rejected with a reason and the element at fault, and
the import goes on with the next one.
"""

from __future__ import annotations

import re
import typing
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from prifed.fhir import units
from prifed.fhir.dates import Placement, day_range, place, second_of_day
from prifed.fhir.quality import Rejection
from prifed.fhir.reader import RawItem
from prifed.fhir.spec import (
    ConditionFeature,
    EncounterCountFeature,
    FeatureSpec,
    ObservationFeature,
    ObservationLabel,
)
from prifed.fhir.store import Fact, FactStore, PatientRecord

_ObservationTarget = ObservationFeature | ObservationLabel
LABEL_SLOT = -1
FOLLOW_UP_SLOT = -2
USED_TYPES = frozenset({"Patient", "Observation", "Condition", "Encounter"})

# Other spellings of the code systems a specification names.
SYSTEM_ALIASES = {
    "urn:oid:2.16.840.1.113883.6.1": "http://loinc.org",
    "urn:oid:2.16.840.1.113883.6.96": "http://snomed.info/sct",
    "urn:oid:2.16.840.1.113883.6.90": "http://hl7.org/fhir/sid/icd-10-cm",
}
LOINC = "http://loinc.org"

OBSERVATION_STATUSES = frozenset({"final", "amended", "corrected", "preliminary"})
CONDITION_EXCLUDED = frozenset({"refuted", "entered-in-error"})
ENCOUNTER_EXCLUDED = frozenset({"planned", "cancelled", "entered-in-error"})
GENDERS = frozenset({"male", "female", "other", "unknown"})

_PATIENT_REF = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
_TYPED_REF = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}"
                        r"(?:/_history/[^/]+)?$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@cache
def _model(resource_type: str) -> Any:
    try:
        return get_fhir_model_class(resource_type)
    except (ValueError, KeyError):
        return None


def _error_reason(error: Mapping[str, Any]) -> str:
    kind = str(error.get("type", ""))
    message = str(error.get("msg", ""))
    if kind == "extra_forbidden":
        return "unknown_element"
    if kind.endswith("missing"):
        return "missing_element"
    if "date" in kind or re.search(r"\b(Date|DateTime|Instant|Time)\b", message):
        return "invalid_date"
    return "invalid_value"


def _element_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if not isinstance(part, int)) or "(root)"


@cache
def _fields(model: Any) -> dict[str, tuple[str, Any]]:
    """Map each JSON name and Python name of a model's fields to (JSON name, type)."""
    found: dict[str, tuple[str, Any]] = {}
    for name, info in model.model_fields.items():
        json_name = info.alias or name
        found[name] = found[json_name] = (json_name, info.annotation)
    return found


def _nested_model(annotation: Any) -> Any:
    """Return the FHIR model class inside a field type such as list[HumanNameType]."""
    klass = getattr(annotation, "get_model_klass", None)
    if klass is not None:
        return klass()
    for argument in typing.get_args(annotation):
        found = _nested_model(argument)
        if found is not None:
            return found
    return None


def _known_path(model: Any, loc: tuple[Any, ...]) -> str:
    """Return the longest prefix of an error location made of the model's fields.

    The shared report names only elements that the R4B model defines, so an
    unknown key, which may be free text from the record, is cut off. An
    unknown top-level key gives "(root)".
    """
    parts: list[str] = []
    current = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = _fields(current).get(str(part)) if current is not None else None
        if field is None:
            break
        parts.append(field[0])
        current = _nested_model(field[1])
    return ".".join(parts) or "(root)"


def _codings(concept: Any) -> list[tuple[str, str]]:
    if concept is None or not concept.coding:
        return []
    found = []
    for coding in concept.coding:
        if coding.code is None:
            continue
        system = coding.system or ""
        found.append((SYSTEM_ALIASES.get(system, system), coding.code))
    return found


def _patient_ref(reference: Any) -> tuple[str | None, str | None]:
    """Return the normalised patient reference, or None and a rejection reason."""
    if reference is None or not reference.reference:
        return None, "no_patient_reference"
    text = reference.reference
    if text.startswith("#"):
        return None, "no_patient_reference"
    match = _PATIENT_REF.search(text)
    if match:
        return f"Patient/{match.group(1)}", None
    if _TYPED_REF.search(text):
        return None, "subject_not_patient"
    return text, None


@dataclass(frozen=True)
class _Window:
    after: int
    until: int


class Extractor:
    """Turn raw items into stored facts and counted rejections."""

    def __init__(self, spec: FeatureSpec, store: FactStore,
                 reject: Callable[[Rejection], None]) -> None:
        self.spec = spec
        self.store = store
        self._reject = reject
        self.index = spec.index_date.toordinal()
        self.read: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.not_recognised: Counter[str] = Counter()
        self.converted: Counter[str] = Counter()
        self.out_of_range: Counter[str] = Counter()
        self.patients_read = 0
        self.patients_rejected = 0
        self._plan()

    def _plan(self) -> None:
        spec = self.spec
        self._obs: dict[str, list[tuple[int, _ObservationTarget]]] = {}
        self._cond: dict[tuple[str, str], list[int]] = {}
        self._encounters: list[tuple[int, EncounterCountFeature]] = []
        self._windows: dict[int, _Window] = {}
        self._condition_systems: set[str] = set()

        for slot, feature in enumerate(spec.features):
            if isinstance(feature, ObservationFeature):
                self._obs.setdefault(feature.loinc, []).append((slot, feature))
                self._windows[slot] = _Window(self.index - feature.window_days,
                                              self.index)
            elif isinstance(feature, ConditionFeature):
                for code in feature.codes:
                    self._cond.setdefault((feature.system, code), []).append(slot)
                self._condition_systems.add(feature.system)
                after = (self.index - feature.window_days if feature.window_days
                         else date.min.toordinal() - 1)
                self._windows[slot] = _Window(after, self.index)
            elif isinstance(feature, EncounterCountFeature):
                self._encounters.append((slot, feature))
                self._windows[slot] = _Window(self.index - feature.window_days,
                                              self.index)

        label = spec.label
        if isinstance(label, ObservationLabel):
            self._obs.setdefault(label.loinc, []).append((LABEL_SLOT, label))
        else:
            for code in label.codes:
                self._cond.setdefault((label.system, code), []).append(LABEL_SLOT)
            self._condition_systems.add(label.system)
        self._horizon = self.index + label.horizon_days
        self._follow_up = label.require_follow_up

    # Rejections

    def _rejected(self, resource_type: str, key: str, reason: str, element: str,
                  source: str, feature: str | None = None,
                  shared_element: str | None = None) -> None:
        self._reject(Rejection(resource_type, key, reason, element, feature, source,
                               shared_element))

    def _rejected_whole(self, resource_type: str, key: str, reason: str,
                        element: str, source: str) -> None:
        """Reject a claimed resource, so its patient is not checked as well."""
        self.store.forget_reference(key)
        self._rejected(resource_type, key, reason, element, source)

    # Items

    def add(self, item: RawItem) -> None:
        """Validate one item and store what the specification needs from it."""
        where = f"{item.source} {item.position}"
        if item.data is None:
            self.read["(undecoded)"] += 1
            self._rejected("(undecoded)", where, item.error or "invalid_json",
                           "(root)", where)
            return

        raw_type = item.data.get("resourceType")
        model = _model(raw_type) if isinstance(raw_type, str) else None
        if model is None:
            self.read["(unknown)"] += 1
            self._rejected("(unknown)", where, "not_a_resource", "resourceType", where)
            return

        resource_type = str(raw_type)
        self.read[resource_type] += 1
        if resource_type not in USED_TYPES:
            self.skipped[resource_type] += 1
            return

        key = self._key(resource_type, item, where)
        try:
            resource = model.model_validate(item.data)
        except ValidationError as error:
            first = error.errors()[0]
            self._rejected(resource_type, key, _error_reason(first),
                           _element_path(first["loc"]), where,
                           shared_element=_known_path(model, first["loc"]))
            if resource_type == "Patient":
                self.patients_rejected += 1
                self.store.add_rejected_patient(self._raw_aliases(item))
            return

        if resource_type == "Patient":
            self._add_patient(resource, item, key, where)
        elif resource_type == "Observation":
            self._add_observation(resource, key, where)
        elif resource_type == "Condition":
            self._add_condition(resource, key, where)
        else:
            self._add_encounter(resource, key, where)

    def _key(self, resource_type: str, item: RawItem, where: str) -> str:
        raw_id = item.data.get("id") if item.data else None
        if isinstance(raw_id, str) and _ID.match(raw_id):
            return f"{resource_type}/{raw_id}"
        if item.full_url:
            return item.full_url
        return where

    def _raw_aliases(self, item: RawItem) -> list[str]:
        aliases = []
        raw_id = item.data.get("id") if item.data else None
        if isinstance(raw_id, str) and _ID.match(raw_id):
            aliases.append(f"Patient/{raw_id}")
        if item.full_url:
            aliases.append(item.full_url)
        return aliases

    def _claim(self, resource_type: str, key: str, subject: Any, where: str
               ) -> str | None:
        """Check identity and subject; return the patient reference or None."""
        ref, problem = _patient_ref(subject)
        if not self.store.claim_resource(key, resource_type, ref, where):
            self._rejected(resource_type, key, "duplicate_id", "id", where)
            return None
        if problem is not None:
            self._rejected(resource_type, key, problem, "subject", where)
            return None
        return ref

    # Patient

    def _add_patient(self, patient: Any, item: RawItem, key: str, where: str) -> None:
        aliases = self._raw_aliases(item)
        if not aliases:
            self.patients_rejected += 1
            self._rejected("Patient", key, "no_id", "id", where)
            return
        if any(self.store.has_alias(alias) for alias in aliases):
            self.patients_rejected += 1
            self._rejected("Patient", key, "duplicate_id", "id", where)
            return

        gender = patient.gender
        if gender is not None and gender not in GENDERS:
            self.not_recognised["Patient.gender"] += 1
            gender = None

        birth = None
        if patient.birthDate is not None:
            birth = day_range(patient.birthDate)
        deceased = bool(patient.deceasedBoolean) or patient.deceasedDateTime is not None
        deceased_on = (day_range(patient.deceasedDateTime)
                       if patient.deceasedDateTime is not None else None)

        record = PatientRecord(key=aliases[0], gender=gender, birth=birth,
                               deceased=deceased, deceased_on=deceased_on)
        self.store.add_patient(record, aliases)
        self.patients_read += 1

    # Observation

    def _add_observation(self, obs: Any, key: str, where: str) -> None:
        ref = self._claim("Observation", key, obs.subject, where)
        if ref is None:
            return
        if obs.status not in OBSERVATION_STATUSES:
            self._rejected_whole("Observation", key, "excluded_status", "status",
                                 where)
            return

        # A match is (slot, target, element holding value[x], its path prefix).
        matches: list[tuple[int, ObservationFeature | ObservationLabel, Any, str]] = []
        has_loinc = False
        for system, code in _codings(obs.code):
            if system == LOINC:
                has_loinc = True
                for slot, target in self._obs.get(code, []):
                    matches.append((slot, target, obs, "value"))
        for component in obs.component or []:
            for system, code in _codings(component.code):
                if system == LOINC:
                    has_loinc = True
                    for slot, target in self._obs.get(code, []):
                        matches.append((slot, target, component, "component.value"))
        if not has_loinc:
            self.not_recognised["Observation.code"] += 1
        if not matches:
            return

        when = (obs.effectiveDateTime or obs.effectiveInstant
                or (obs.effectivePeriod.start or obs.effectivePeriod.end
                    if obs.effectivePeriod else None))
        days = day_range(when) if when is not None else None
        if days is None:
            self._rejected_whole("Observation", key, "no_date", "effective[x]", where)
            return

        done: set[int] = set()
        for slot, target, holder, element in matches:
            if slot in done:
                continue
            done.add(slot)
            self._observation_value(ref, key, where, slot, target, holder,
                                    element, days, second_of_day(when))

    def _observation_value(self, ref: str, key: str, where: str, slot: int,
                           target: ObservationFeature | ObservationLabel,
                           holder: Any, element: str, days: tuple[int, int],
                           second: int) -> None:
        name = target.name
        if slot == LABEL_SLOT:
            placement = self._label_placement(days)
        else:
            window = self._windows[slot]
            placement = place(days, window.after, window.until)
        if placement is Placement.OUTSIDE:
            return
        if placement is Placement.STRADDLES:
            self._rejected("Observation", key, "imprecise_date", "effective[x]",
                           where, name)
            return

        value = self._quantity_value(key, where, name, holder, element, target)
        if value is None:
            return
        if isinstance(target, ObservationFeature):
            too_low = target.min is not None and value < target.min
            too_high = target.max is not None and value > target.max
            if too_low or too_high:
                self.out_of_range[name] += 1
                self._rejected("Observation", key, "out_of_range",
                               f"{element}Quantity.value", where, name)
                return
        self.store.add_fact(ref, Fact(slot, days[1], second, value, key))

    def _quantity_value(self, key: str, where: str, name: str, holder: Any,
                        element: str,
                        target: ObservationFeature | ObservationLabel
                        ) -> float | None:
        quantity = holder.valueQuantity
        if quantity is None:
            other = [field for field in type(holder).model_fields
                     if field.startswith("value") and not field.endswith("__ext")
                     and field != "valueQuantity"
                     and getattr(holder, field, None) is not None]
            reason = "value_not_quantity" if other else "no_value"
            self._rejected("Observation", key, reason, f"{element}[x]", where, name)
            return None
        if quantity.value is None:
            self._rejected("Observation", key, "no_value", f"{element}Quantity.value",
                           where, name)
            return None
        if quantity.comparator is not None:
            self._rejected("Observation", key, "censored_value",
                           f"{element}Quantity.comparator", where, name)
            return None
        if not (quantity.code or quantity.unit):
            self._rejected("Observation", key, "no_unit", f"{element}Quantity.code",
                           where, name)
            return None
        unit = units.resolve_unit(quantity.code, quantity.system, quantity.unit)
        if unit is None:
            self._rejected("Observation", key, "unknown_unit",
                           f"{element}Quantity.code", where, name)
            return None
        try:
            value = units.convert(float(quantity.value), unit, target.unit,
                                  target.loinc)
        except units.UnitError:
            self._rejected("Observation", key, "unit_not_convertible",
                           f"{element}Quantity.code", where, name)
            return None
        if unit != target.unit:
            self.converted[name] += 1
        return value

    def _label_placement(self, days: tuple[int, int]) -> Placement:
        """Place a label record: before the index (prevalent) or in the horizon."""
        prior = place(days, date.min.toordinal() - 1, self.index)
        if prior is Placement.INSIDE:
            exclude = self.spec.label.exclude_prevalent
            return Placement.INSIDE if exclude else Placement.OUTSIDE
        future = place(days, self.index, self._horizon)
        if prior is Placement.STRADDLES or future is Placement.STRADDLES:
            return Placement.STRADDLES
        return future

    # Condition

    def _add_condition(self, condition: Any, key: str, where: str) -> None:
        ref = self._claim("Condition", key, condition.subject, where)
        if ref is None:
            return
        status = {code for _, code in _codings(condition.verificationStatus)}
        if status & CONDITION_EXCLUDED:
            self._rejected_whole("Condition", key, "excluded_status",
                                 "verificationStatus", where)
            return

        codings = _codings(condition.code)
        if self._condition_systems and not any(
                system in self._condition_systems for system, _ in codings):
            self.not_recognised["Condition.code"] += 1
        slots = sorted({slot for coding in codings
                        for slot in self._cond.get(coding, [])})
        if not slots:
            return

        when = (condition.onsetDateTime
                or (condition.onsetPeriod.start if condition.onsetPeriod else None)
                or condition.recordedDate)
        days = day_range(when) if when is not None else None
        if days is None:
            self._rejected_whole("Condition", key, "no_date", "onset[x]", where)
            return

        for slot in slots:
            if slot == LABEL_SLOT:
                placement = self._label_placement(days)
                name = self.spec.label.name
            else:
                window = self._windows[slot]
                placement = place(days, window.after, window.until)
                name = self.spec.features[slot].name
            if placement is Placement.STRADDLES:
                self._rejected("Condition", key, "imprecise_date", "onset[x]",
                               where, name)
            elif placement is Placement.INSIDE:
                self.store.add_fact(ref, Fact(slot, days[1], second_of_day(when),
                                              1.0, key))

    # Encounter

    def _add_encounter(self, encounter: Any, key: str, where: str) -> None:
        ref = self._claim("Encounter", key, encounter.subject, where)
        if ref is None:
            return
        if not self._encounters and not self._follow_up:
            return
        if encounter.status in ENCOUNTER_EXCLUDED:
            self._rejected_whole("Encounter", key, "excluded_status", "status", where)
            return

        period = encounter.period
        when = (period.start or period.end) if period is not None else None
        days = day_range(when) if when is not None else None
        if days is None:
            self._rejected_whole("Encounter", key, "no_date", "period.start", where)
            return
        second = second_of_day(when)

        klass = encounter.class_fhir
        class_code = klass.code if klass is not None else None
        for slot, feature in self._encounters:
            if feature.classes and class_code not in feature.classes:
                continue
            window = self._windows[slot]
            placement = place(days, window.after, window.until)
            if placement is Placement.STRADDLES:
                self._rejected("Encounter", key, "imprecise_date", "period.start",
                               where, feature.name)
            elif placement is Placement.INSIDE:
                self.store.add_fact(ref, Fact(slot, days[1], second, 1.0, key))

        if self._follow_up:
            placement = place(days, self.index, self._horizon)
            if placement is Placement.INSIDE:
                self.store.add_fact(ref, Fact(FOLLOW_UP_SLOT, days[1], second,
                                              1.0, key))
