"""Data-quality reports: per-site aggregate counts and the federation table.

A :class:`QualityReport` holds only counts, names from the specification and
names of FHIR elements: no patient value, no resource id and no file name. It
is the part of an import that may leave a site. The resource ids of rejected
records stay in the site's local rejection log (see ``RejectionLog``).

:func:`merge_reports` gathers every site's report into one
:class:`FederationReport`, refuses reports made with another specification,
and lists warnings that point at a site whose mapping looks broken.
"""

from __future__ import annotations

import csv
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    model_validator,
)

from prifed.errors import ConfigError, DataError
from prifed.fhir.output import atomic_text

REPORT_FORMAT = "prifed.fhir.quality/1"

# Element names and other labels that travel in a report must match this
# pattern (safe_label replaces any other text and the report model validates
# it), so that free text from a record cannot leak through a malformed key.
LABEL_PATTERN = r"^(\([a-z]+\)|[A-Za-z][A-Za-z0-9_.\[\]-]{0,99})$"
_LABEL_RE = re.compile(LABEL_PATTERN)
SITE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Label = Annotated[str, StringConstraints(pattern=LABEL_PATTERN)]
# A count: an integer of at least 0. Strict, so true, 1.0 and "1" are rejected.
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]

# Reasons for rejecting a record, as they appear in reports and logs.
REASONS: dict[str, str] = {
    "invalid_json": "the line or file is not valid JSON",
    "resource_too_large": "the line, file or Bundle entry is over the size limit",
    "not_a_resource": "the JSON object has no known resourceType",
    "unsupported_bundle": "the Bundle type is not one PriFed reads",
    "invalid_date": "a date, dateTime or instant is not a valid FHIR value",
    "missing_element": "a required element is missing",
    "unknown_element": "the resource has an element its R4B model does not define",
    "invalid_value": "an element has a value its R4B model does not accept",
    "duplicate_id": "another resource of the same type has the same id",
    "no_id": "the Patient has neither an id nor a fullUrl",
    "no_patient_reference": "the resource has no reference to its patient",
    "subject_not_patient": "the subject is not a Patient",
    "patient_not_found": "the referenced Patient is not in the export",
    "patient_rejected": "the referenced Patient was itself rejected",
    "excluded_status": "the status marks the record as not valid for use",
    "no_date": "the record has no date to place it in time",
    "imprecise_date": "a partial date straddles a window boundary",
    "no_value": "the Observation has no value",
    "value_not_quantity": "the Observation value is not a Quantity",
    "censored_value": "the Quantity has a comparator such as '<'",
    "no_unit": "the Quantity has no unit",
    "unknown_unit": "the unit is not one PriFed recognises",
    "unit_not_convertible": "the unit cannot be converted to the expected one",
    "out_of_range": "the value is outside the range the specification allows",
}

# Reasons for leaving an otherwise valid patient out of the table.
EXCLUSIONS: dict[str, str] = {
    "born_after_index": "born after the index date",
    "deceased_before_index": "died on or before the index date",
    "deceased_date_unknown": "recorded as deceased without a usable date",
    "prevalent_label": "the label outcome was already recorded by the index date",
    "no_follow_up": "no Encounter within the label horizon",
    "label_missing": "no Observation to decide the label within the horizon",
    "incomplete_features": "a feature is missing and the spec drops such rows",
}


def safe_label(text: str) -> str:
    """Return text when it may travel in a report, else a fixed placeholder."""
    return text if _LABEL_RE.match(text) else "(unrecognised)"


class _Counts(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RejectionCount(_Counts):
    """How many records were rejected for one reason at one element."""

    resource_type: str = Field(pattern=LABEL_PATTERN)
    reason: str = Field(pattern=LABEL_PATTERN)
    element: str = Field(pattern=LABEL_PATTERN)
    feature: str | None = Field(default=None, pattern=LABEL_PATTERN)
    count: NonNegativeInt


class FeatureCounts(_Counts):
    """Per-feature counts over the eligible patients and the values read.

    ``nonzero`` counts eligible patients whose value is not 0, which for a
    condition or encounter feature (never missing) shows whether the codes
    are recorded at all.
    """

    present: NonNegativeInt = 0
    missing: NonNegativeInt = 0
    nonzero: NonNegativeInt = 0
    out_of_range: NonNegativeInt = 0
    unit_converted: NonNegativeInt = 0


class PatientCounts(_Counts):
    """Patients read, rejected, excluded (by reason) and written to the table."""

    read: NonNegativeInt = 0
    rejected: NonNegativeInt = 0
    excluded: dict[Label, NonNegativeInt] = Field(default_factory=dict)
    eligible: NonNegativeInt = 0
    in_table: NonNegativeInt = 0


class LabelCounts(_Counts):
    """Label values among the rows of the table."""

    positive: NonNegativeInt = 0
    negative: NonNegativeInt = 0


class QualityReport(_Counts):
    """Aggregate data-quality counts of one site's import; safe to share."""

    format: Literal["prifed.fhir.quality/1"] = "prifed.fhir.quality/1"
    site: str = Field(pattern=SITE_PATTERN)
    spec_name: str
    spec_version: str
    spec_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    files_read: NonNegativeInt = 0
    files_ignored: NonNegativeInt = 0
    resources_read: dict[Label, NonNegativeInt] = Field(default_factory=dict)
    resources_skipped: dict[Label, NonNegativeInt] = Field(default_factory=dict)
    rejections: list[RejectionCount] = Field(default_factory=list)
    codes_not_recognised: dict[Label, NonNegativeInt] = Field(default_factory=dict)
    patients: PatientCounts = Field(default_factory=PatientCounts)
    features: dict[Label, FeatureCounts] = Field(default_factory=dict)
    label: LabelCounts = Field(default_factory=LabelCounts)

    @model_validator(mode="after")
    def _check_consistent(self) -> QualityReport:
        """Reject counts that no import can produce, listing every problem."""
        patients = self.patients
        problems = []
        if patients.eligible > patients.read:
            problems.append(f"patients.eligible ({patients.eligible}) must be at "
                            f"most patients.read ({patients.read})")
        if patients.in_table > patients.eligible:
            problems.append(f"patients.in_table ({patients.in_table}) must be at "
                            f"most patients.eligible ({patients.eligible})")
        excluded = sum(patients.excluded.values())
        if excluded > patients.read:
            problems.append(f"patients.excluded sums to {excluded}; it must be at "
                            f"most patients.read ({patients.read})")
        labelled = self.label.positive + self.label.negative
        if labelled != patients.in_table:
            problems.append(f"label.positive + label.negative ({labelled}) must "
                            f"equal patients.in_table ({patients.in_table})")
        for name, counts in self.features.items():
            seen = counts.present + counts.missing
            if seen != patients.eligible:
                problems.append(f"features.{name}.present + missing ({seen}) must "
                                f"equal patients.eligible ({patients.eligible})")
            if counts.nonzero > counts.present:
                problems.append(f"features.{name}.nonzero ({counts.nonzero}) must "
                                f"be at most its present ({counts.present})")
        if problems:
            raise ValueError("inconsistent counts: " + "; ".join(problems))
        return self

    @property
    def total_read(self) -> int:
        """Number of resources read, of every type."""
        return sum(self.resources_read.values())

    @property
    def total_rejected(self) -> int:
        """Number of rejections of every reason."""
        return sum(item.count for item in self.rejections)

    def rejections_by_reason(self) -> dict[str, int]:
        """Return the number of rejections for each reason."""
        totals: Counter[str] = Counter()
        for item in self.rejections:
            totals[item.reason] += item.count
        return dict(sorted(totals.items()))

    def to_json(self) -> str:
        """Serialise the report as indented JSON."""
        return self.model_dump_json(indent=2)


def parse_report(data: Mapping[str, Any] | str | bytes,
                 source: str | Path | None = None) -> QualityReport:
    """Validate a report received from a site; raise DataError naming fields.

    ``source``, such as the file name, is named in the error. Each problem
    gives the field path (``(document)`` for the whole report, as for JSON
    that does not parse), the rule broken and the pydantic error type.
    """
    try:
        if isinstance(data, (str, bytes)):
            return QualityReport.model_validate_json(data)
        return QualityReport.model_validate(dict(data))
    except ValidationError as error:
        problems = [
            (".".join(str(part) for part in item["loc"]) or "(document)")
            + f": {item['msg']} ({item['type']})"
            for item in error.errors()
        ]
        where = f" {source}" if source is not None else ""
        raise DataError(
            f"invalid quality report{where}: " + "; ".join(problems)) from None


def load_report(path: str | Path) -> QualityReport:
    """Read and validate a report JSON file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise DataError(
            f"cannot read quality report {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise DataError(f"invalid quality report {path}: not UTF-8 text") from None
    return parse_report(text, source=path)


@dataclass(frozen=True)
class Rejection:
    """One rejected record, for the site's local log.

    ``element`` is the full element path for the local log. ``shared_element``,
    when set, replaces it in the shared report, because the full path may
    contain a key taken from the record.
    """

    resource_type: str
    resource_id: str
    reason: str
    element: str
    feature: str | None = None
    source: str = ""
    shared_element: str | None = None


class RejectionLog:
    """Local CSV log of rejected records: type, id, element, reason, never values.

    The log names resource ids and input files, so it stays at the site. With
    no path it only keeps the first ``keep`` rejections in memory. With a
    path, rows go to a temporary file beside it that replaces the path only
    when the ``with`` block ends without an exception.
    """

    COLUMNS = ("resource_type", "resource_id", "reason", "element", "feature", "source")

    def __init__(self, path: str | Path | None = None, keep: int = 1000) -> None:
        self.path = Path(path) if path is not None else None
        self.keep = keep
        self.first: list[Rejection] = []
        self._output: ExitStack | None = None
        self._writer: Any = None

    def add(self, rejection: Rejection) -> None:
        """Record one rejection."""
        if len(self.first) < self.keep:
            self.first.append(rejection)
        if self._writer is not None:
            self._writer.writerow([
                rejection.resource_type, rejection.resource_id, rejection.reason,
                rejection.element, rejection.feature or "", rejection.source,
            ])

    def __enter__(self) -> RejectionLog:
        if self.path is not None:
            self._output = ExitStack()
            handle = self._output.enter_context(atomic_text(self.path, "--rejections"))
            self._writer = csv.writer(handle)
            self._writer.writerow(self.COLUMNS)
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        output, self._output, self._writer = self._output, None, None
        if output is not None:
            output.__exit__(exc_type, exc, tb)


@dataclass
class FederationReport:
    """Every site's quality report side by side, with warnings."""

    spec_hash: str
    reports: list[QualityReport]
    warnings: list[str] = field(default_factory=list)

    @property
    def sites(self) -> list[str]:
        """Site names in the order their reports were given."""
        return [report.site for report in self.reports]

    def rows(self) -> list[dict[str, Any]]:
        """Return one summary row per site and a final total row."""
        rows = [_summary_row(report) for report in self.reports]
        total: dict[str, Any] = {"site": "(all)"}
        for key in rows[0] if rows else []:
            if key != "site":
                total[key] = sum(row[key] for row in rows)
        return rows + [total]

    def feature_rows(self) -> list[dict[str, Any]]:
        """Return, per feature, the fraction of eligible patients with a value."""
        names = list(self.reports[0].features) if self.reports else []
        table = []
        for name in names:
            row: dict[str, Any] = {"feature": name}
            for report in self.reports:
                row[report.site] = _present_fraction(report, name)
            table.append(row)
        return table

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready form: hash, per-site rows, features, warnings."""
        return {
            "spec_hash": self.spec_hash,
            "sites": self.rows(),
            "features": self.feature_rows(),
            "warnings": list(self.warnings),
            "reports": [report.model_dump(mode="json") for report in self.reports],
        }

    def format_text(self) -> str:
        """Render the tables and warnings as plain text."""
        lines = [f"specification {self.spec_hash[:12]}"]
        lines += _format_table(self.rows())
        lines.append("")
        lines.append("fraction of eligible patients with a value")
        lines += _format_table(self.feature_rows())
        if self.warnings:
            lines.append("")
            lines += [f"warning: {text}" for text in self.warnings]
        return "\n".join(lines)


def _summary_row(report: QualityReport) -> dict[str, Any]:
    return {
        "site": report.site,
        "resources": report.total_read,
        "rejected": report.total_rejected,
        "patients": report.patients.read,
        "excluded": sum(report.patients.excluded.values()),
        "rows": report.patients.in_table,
        "positive": report.label.positive,
        "negative": report.label.negative,
    }


def _present_fraction(report: QualityReport, name: str) -> float | None:
    counts = report.features.get(name)
    if counts is None:
        return None
    seen = counts.present + counts.missing
    return counts.present / seen if seen else None


def _format_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    keys = list(rows[0])

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    widths = {k: max(len(k), *(len(cell(row.get(k))) for row in rows)) for k in keys}
    header = "  ".join(k.ljust(widths[k]) for k in keys).rstrip()
    body = ["  ".join(cell(row.get(k)).ljust(widths[k]) for k in keys).rstrip()
            for row in rows]
    return [header, *body]


def merge_reports(reports: Iterable[QualityReport | Mapping[str, Any]],
                  expected_hash: str | None = None,
                  missing_gap: float = 0.5,
                  max_rejected_fraction: float = 0.05) -> FederationReport:
    """Gather site reports into one table; raise ConfigError on a spec mismatch.

    ``expected_hash`` is the coordinator's specification hash. Without it, the
    reports must agree with each other. A warning names a site where:

    * a feature is present for a fraction of patients more than
      ``missing_gap`` below the median of the other sites;
    * a condition or count feature is 0 for every patient but not elsewhere;
    * more than ``max_rejected_fraction`` of the resources read were rejected;
    * a value was rejected for its unit;
    * the table has no rows or only one label class.
    """
    parsed = [item if isinstance(item, QualityReport) else parse_report(item)
              for item in reports]
    if not parsed:
        raise DataError("no quality reports to merge; expected at least one site")

    sites = [report.site for report in parsed]
    repeated = sorted({site for site in sites if sites.count(site) > 1})
    if repeated:
        raise DataError(f"site names must be unique; repeated: {', '.join(repeated)}")

    reference = expected_hash or parsed[0].spec_hash
    mismatched = [f"{r.site} ({r.spec_hash[:12]})" for r in parsed
                  if r.spec_hash != reference]
    if mismatched:
        raise ConfigError(
            f"sites used a different feature specification than {reference[:12]}: "
            + ", ".join(mismatched)
        )

    federation = FederationReport(spec_hash=reference, reports=parsed)
    federation.warnings = _warnings(parsed, missing_gap, max_rejected_fraction)
    return federation


def _warnings(reports: list[QualityReport], missing_gap: float,
              max_rejected_fraction: float) -> list[str]:
    warnings: list[str] = []
    for report in reports:
        if report.patients.in_table == 0:
            warnings.append(f"site {report.site}: the table has no rows")
        elif min(report.label.positive, report.label.negative) == 0:
            warnings.append(
                f"site {report.site}: every row has the same label, so AUC is "
                "undefined there"
            )

        read = report.total_read
        rejected = report.total_rejected
        if read and rejected / read > max_rejected_fraction:
            warnings.append(
                f"site {report.site}: {rejected} rejections for {read} resources "
                f"read ({rejected / read:.0%})"
            )

        unit_problems = Counter(
            item.feature or item.element for item in report.rejections
            if item.reason in ("unknown_unit", "unit_not_convertible", "no_unit")
        )
        for name, count in sorted(unit_problems.items()):
            warnings.append(
                f"site {report.site}: {count} values of {name} rejected for their unit"
            )

    if len(reports) > 1:
        for name in reports[0].features:
            for report in reports:
                own = _present_fraction(report, name)
                others = [_present_fraction(other, name) for other in reports
                          if other is not report]
                known = [value for value in others if value is not None]
                if own is None or not known:
                    continue
                median = statistics.median(known)
                if median - own > missing_gap or (own == 0.0 and median > 0.0):
                    warnings.append(
                        f"site {report.site}: feature {name} present for {own:.0%} "
                        f"of patients against a median of {median:.0%} elsewhere; "
                        "check its code and unit mapping"
                    )
            warnings += _never_recorded(reports, name, min_elsewhere=0.05)
    return warnings


def _nonzero_fraction(report: QualityReport, name: str) -> float | None:
    counts = report.features.get(name)
    if counts is None or counts.present == 0:
        return None
    return counts.nonzero / counts.present


def _never_recorded(reports: list[QualityReport], name: str,
                    min_elsewhere: float) -> list[str]:
    """Warn about sites where a feature is always 0 but common elsewhere."""
    warnings = []
    for report in reports:
        own = _nonzero_fraction(report, name)
        others = [_nonzero_fraction(r, name) for r in reports if r is not report]
        known = [value for value in others if value is not None]
        if own != 0.0 or not known:
            continue
        median = statistics.median(known)
        if median >= min_elsewhere:
            warnings.append(
                f"site {report.site}: feature {name} is 0 for every patient "
                f"against a median of {median:.0%} non-zero elsewhere; check its codes"
            )
    return warnings
