"""FHIR R4 ingestion: from a site's records to a shared feature table.

A federation agrees on a feature specification (:mod:`prifed.fhir.spec`),
whose hash travels with every update. Each site turns its transaction bundles
or bulk-export NDJSON into the table the specification describes, with
:func:`load_site_table` or ``prifed data from-fhir``, and gets a
:class:`QualityReport` of aggregate counts that it may share. The coordinator
gathers the reports with :func:`merge_reports` before training starts.

Modules: ``spec`` (specification and hash), ``reader`` (streaming input),
``extract`` (validation and facts, first pass), ``store`` (on-disk spill by
patient), ``ingest`` (second pass and table), ``units``, ``dates``,
``quality`` (reports) and ``cli`` (the ``prifed data`` commands).
"""

from prifed.fhir.ingest import SiteImport, load_site_table, write_site_table
from prifed.fhir.quality import (
    FederationReport,
    QualityReport,
    RejectionLog,
    load_report,
    merge_reports,
    parse_report,
)
from prifed.fhir.spec import FeatureSpec, load_spec, parse_spec, spec_hash

__all__ = [
    "FeatureSpec",
    "FederationReport",
    "QualityReport",
    "RejectionLog",
    "SiteImport",
    "load_report",
    "load_site_table",
    "load_spec",
    "merge_reports",
    "parse_report",
    "parse_spec",
    "spec_hash",
    "write_site_table",
]
