"""Turn a site's FHIR export into its feature table and quality report.

The import runs in two passes over bounded memory. The first streams every
input file, validates each resource and spills the facts the specification
needs to an on-disk SQLite store (see :mod:`prifed.fhir.store`). The second
reads the facts back one patient at a time, decides exclusions, features and
label, and hands each finished row to a sink: a CSV writer for the command
line, or a list for :func:`load_site_table`. Memory therefore grows with one
patient's records and with the output rows a caller keeps, not with the size
of the export.
"""

from __future__ import annotations

import csv
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd

from prifed.errors import ConfigError, DataError
from prifed.fhir.dates import completed_years
from prifed.fhir.extract import FOLLOW_UP_SLOT, LABEL_SLOT, Extractor
from prifed.fhir.quality import (
    SITE_PATTERN,
    FeatureCounts,
    LabelCounts,
    PatientCounts,
    QualityReport,
    Rejection,
    RejectionCount,
    RejectionLog,
    safe_label,
)
from prifed.fhir.output import atomic_text, check_outputs
from prifed.fhir.reader import MAX_RESOURCE_BYTES, discover, iter_items
from prifed.fhir.spec import (
    AgeFeature,
    ConditionLabel,
    FeatureSpec,
    ObservationFeature,
    ObservationLabel,
    SexFeature,
    load_spec,
    spec_hash,
)
from prifed.fhir.store import Fact, FactStore, PatientRecord
from prifed.log import get_logger

logger = get_logger(__name__)

Row = list[Any]
_SITE_RE = re.compile(SITE_PATTERN)
# Distinct (type, reason, element, feature) keys kept in a report; the rest
# are counted under one "(other)" key, so a broken export cannot grow it.
_MAX_REJECTION_KEYS = 500
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda value, threshold: value >= threshold,
    ">": lambda value, threshold: value > threshold,
    "<=": lambda value, threshold: value <= threshold,
    "<": lambda value, threshold: value < threshold,
}


class _Tally:
    """Counters of one import, turned into a QualityReport at the end."""

    def __init__(self, log: RejectionLog) -> None:
        self.log = log
        self.rejections: Counter[tuple[str, str, str, str | None]] = Counter()
        self.excluded: Counter[str] = Counter()
        self.present: Counter[str] = Counter()
        self.missing: Counter[str] = Counter()
        self.nonzero: Counter[str] = Counter()
        self.age_out_of_range = 0
        self.eligible = 0
        self.in_table = 0
        self.positive = 0
        self.negative = 0

    def reject(self, rejection: Rejection) -> None:
        element = rejection.shared_element or rejection.element
        key = (safe_label(rejection.resource_type), rejection.reason,
               safe_label(element), rejection.feature)
        if key not in self.rejections and len(self.rejections) >= _MAX_REJECTION_KEYS:
            key = ("(other)", rejection.reason, "(other)", None)
        self.rejections[key] += 1
        self.log.add(rejection)


def _resolve_spec(spec: FeatureSpec | str | Path) -> FeatureSpec:
    return spec if isinstance(spec, FeatureSpec) else load_spec(spec)


def _check_site(site: str) -> None:
    if not _SITE_RE.match(site):
        raise ConfigError(
            "site name must be 1-64 letters, digits, '.', '_' or '-', starting "
            f"with a letter or digit; got {site!r}"
        )


class SiteImport:
    """One site's import of a FHIR export under a feature specification."""

    def __init__(self, source: str | Path, spec: FeatureSpec | str | Path,
                 site: str, work_dir: str | Path | None = None,
                 rejections: str | Path | None = None,
                 max_resource_bytes: int = MAX_RESOURCE_BYTES) -> None:
        _check_site(site)
        if max_resource_bytes < 1:
            raise ConfigError(
                f"max_resource_bytes must be at least 1; got {max_resource_bytes}")
        if work_dir is not None and not Path(work_dir).is_dir():
            raise DataError(f"--work-dir {work_dir} is not an existing folder")
        self.max_resource_bytes = max_resource_bytes
        self.source = Path(source)
        self.spec = _resolve_spec(spec)
        self.site = site
        self.work_dir = work_dir
        self.rejections_path = rejections
        self.index_day = self.spec.index_date.toordinal()

    def run(self, sink: Callable[[Row], None]) -> QualityReport:
        """Read the export, pass each table row to ``sink`` and return the report."""
        files, ignored = discover(self.source)
        started = time.perf_counter()
        logger.info("ingest: site %s reading %d files (%d ignored), spec %s %s",
                    self.site, len(files), ignored, self.spec.name, self.spec.version)

        log = RejectionLog(self.rejections_path)
        with log, FactStore(self.work_dir) as store:
            tally = _Tally(log)
            extractor = Extractor(self.spec, store, tally.reject)
            for path in files:
                label = str(path.relative_to(self.source)) if self.source.is_dir() \
                    else path.name
                for item in iter_items(path, label, self.max_resource_bytes):
                    extractor.add(item)
            store.flush()
            read_seconds = time.perf_counter() - started

            for resource_type, key, rejected, where in store.unresolved():
                reason = "patient_rejected" if rejected else "patient_not_found"
                tally.reject(Rejection(resource_type, key, reason, "subject",
                                       source=where))

            for record, facts in store.patients():
                row = self._row(record, facts, tally)
                if row is not None:
                    tally.in_table += 1
                    sink(row)

        report = self._report(files, ignored, extractor, tally)
        elapsed = time.perf_counter() - started
        logger.info(
            "ingest: site %s read %d resources, %d rejections, %d patients, "
            "%d rows (%d positive) in %.1f s (first pass %.1f s)",
            self.site, report.total_read, report.total_rejected,
            report.patients.read, report.patients.in_table, report.label.positive,
            elapsed, read_seconds,
        )
        return report

    def _row(self, record: PatientRecord, facts: list[Fact],
             tally: _Tally) -> Row | None:
        exclusion = self._exclusion(record)
        by_slot: dict[int, list[Fact]] = {}
        for fact in facts:
            by_slot.setdefault(fact.slot, []).append(fact)

        label = None
        if exclusion is None:
            label, exclusion = self._label(by_slot)
        if exclusion is not None:
            tally.excluded[exclusion] += 1
            return None

        tally.eligible += 1
        values: list[Any] = []
        complete = True
        for slot, feature in enumerate(self.spec.features):
            value = self._feature(slot, feature, record, by_slot.get(slot, []), tally)
            if value is None:
                tally.missing[feature.name] += 1
                complete = False
            else:
                tally.present[feature.name] += 1
                if value != 0:
                    tally.nonzero[feature.name] += 1
            values.append(value)

        if not complete and self.spec.missing == "drop":
            tally.excluded["incomplete_features"] += 1
            return None
        if label:
            tally.positive += 1
        else:
            tally.negative += 1
        return [self.site, *values, label]

    def _exclusion(self, record: PatientRecord) -> str | None:
        if record.birth is not None and record.birth[0] > self.index_day:
            return "born_after_index"
        if record.deceased:
            if record.deceased_on is None:
                return "deceased_date_unknown"
            if record.deceased_on[1] <= self.index_day:
                return "deceased_before_index"
            if record.deceased_on[0] <= self.index_day:
                return "deceased_date_unknown"
        return None

    def _label(self, by_slot: dict[int, list[Fact]]) -> tuple[int | None, str | None]:
        label = self.spec.label
        records = by_slot.get(LABEL_SLOT, [])
        prior = [fact for fact in records if fact.day <= self.index_day]
        future = [fact for fact in records if fact.day > self.index_day]

        if isinstance(label, ConditionLabel):
            if label.exclude_prevalent and prior:
                return None, "prevalent_label"
            if label.require_follow_up and FOLLOW_UP_SLOT not in by_slot:
                return None, "no_follow_up"
            return int(bool(future)), None

        assert isinstance(label, ObservationLabel)
        meets = _COMPARE[label.comparison]
        if label.exclude_prevalent and any(meets(f.value, label.threshold)
                                           for f in prior):
            return None, "prevalent_label"
        if label.require_follow_up and FOLLOW_UP_SLOT not in by_slot:
            return None, "no_follow_up"
        if not future:
            return None, "label_missing"
        return int(any(meets(f.value, label.threshold) for f in future)), None

    def _feature(self, slot: int, feature: Any, record: PatientRecord,
                 facts: list[Fact], tally: _Tally) -> Any:
        if isinstance(feature, AgeFeature):
            return self._age(feature, record, tally)
        if isinstance(feature, SexFeature):
            return {"male": 1, "female": 0}.get(record.gender or "")
        if isinstance(feature, ObservationFeature):
            if not facts:
                return None
            values = [fact.value for fact in facts]
            if feature.aggregate == "latest":
                return values[-1]
            if feature.aggregate == "min":
                return min(values)
            if feature.aggregate == "max":
                return max(values)
            return math.fsum(values) / len(values)
        if feature.kind == "condition":
            return int(bool(facts))
        return len(facts)

    def _age(self, feature: AgeFeature, record: PatientRecord,
             tally: _Tally) -> int | None:
        if record.birth is None:
            return None
        index = self.spec.index_date
        oldest = completed_years(date.fromordinal(record.birth[0]), index)
        youngest = completed_years(date.fromordinal(record.birth[1]), index)
        if oldest != youngest:
            tally.reject(Rejection("Patient", record.key, "imprecise_date",
                                   "birthDate", feature.name))
            return None
        too_low = feature.min is not None and oldest < feature.min
        too_high = feature.max is not None and oldest > feature.max
        if too_low or too_high:
            tally.age_out_of_range += 1
            tally.reject(Rejection("Patient", record.key, "out_of_range",
                                   "birthDate", feature.name))
            return None
        return oldest

    def _report(self, files: list[Path], ignored: int, extractor: Extractor,
                tally: _Tally) -> QualityReport:
        features: dict[str, FeatureCounts] = {}
        for feature in self.spec.features:
            out_of_range = extractor.out_of_range[feature.name]
            if isinstance(feature, AgeFeature):
                out_of_range = tally.age_out_of_range
            features[feature.name] = FeatureCounts(
                present=tally.present[feature.name],
                missing=tally.missing[feature.name],
                nonzero=tally.nonzero[feature.name],
                out_of_range=out_of_range,
                unit_converted=extractor.converted[feature.name],
            )
        rejections = [
            RejectionCount(resource_type=t, reason=r, element=e, feature=f, count=n)
            for (t, r, e, f), n in sorted(tally.rejections.items(),
                                          key=lambda item: tuple(map(str, item[0])))
        ]
        return QualityReport(
            site=self.site,
            spec_name=self.spec.name,
            spec_version=self.spec.version,
            spec_hash=spec_hash(self.spec),
            files_read=len(files),
            files_ignored=ignored,
            resources_read=dict(sorted(extractor.read.items())),
            resources_skipped=dict(sorted(extractor.skipped.items())),
            rejections=rejections,
            codes_not_recognised=dict(sorted(extractor.not_recognised.items())),
            patients=PatientCounts(
                read=extractor.patients_read,
                rejected=extractor.patients_rejected,
                excluded=dict(sorted(tally.excluded.items())),
                eligible=tally.eligible,
                in_table=tally.in_table,
            ),
            features=features,
            label=LabelCounts(positive=tally.positive, negative=tally.negative),
        )


def load_site_table(source: str | Path, spec: FeatureSpec | str | Path,
                    site: str = "local", work_dir: str | Path | None = None,
                    rejections: str | Path | None = None,
                    max_resource_bytes: int = MAX_RESOURCE_BYTES,
                    ) -> tuple[pd.DataFrame, QualityReport]:
    """Read a FHIR export into a feature table and its quality report.

    The table has the columns of ``spec.columns``: ``site``, one column per
    feature in specification order, then the label (0 or 1). Missing values are
    NaN when the specification keeps incomplete rows.
    """
    if rejections is not None:
        check_outputs([("rejections", Path(rejections))])
    job = SiteImport(source, spec, site, work_dir, rejections, max_resource_bytes)
    rows: list[Row] = []
    report = job.run(rows.append)
    table = pd.DataFrame(rows, columns=job.spec.columns)
    return table, report


def write_site_table(source: str | Path, spec: FeatureSpec | str | Path,
                     site: str, output: str | Path,
                     report_path: str | Path | None = None,
                     work_dir: str | Path | None = None,
                     rejections: str | Path | None = None,
                     max_resource_bytes: int = MAX_RESOURCE_BYTES) -> QualityReport:
    """Stream a FHIR export into a CSV feature table; optionally write the report.

    Every output path is checked before the export is read, and each output
    appears only when the whole import succeeds.
    """
    source_path = Path(source)
    outputs = [("--output", Path(output)),
               ("--report", Path(report_path) if report_path is not None else None),
               ("--rejections", Path(rejections) if rejections is not None else None)]
    check_outputs(outputs, inputs=[source_path] if source_path.is_file() else [])
    job = SiteImport(source, spec, site, work_dir, rejections, max_resource_bytes)
    with atomic_text(output, "--output") as handle:
        writer = csv.writer(handle)
        writer.writerow(job.spec.columns)
        report = job.run(lambda row: writer.writerow(
            ["" if value is None else value for value in row]))
    if report_path is not None:
        with atomic_text(report_path, "--report") as handle:
            handle.write(report.to_json() + "\n")
    return report
