"""The ``prifed data`` commands: FHIR export to feature table, hashes, reports."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from prifed.errors import DataError
from prifed.fhir.ingest import write_site_table
from prifed.fhir.output import atomic_text, check_outputs
from prifed.fhir.quality import QualityReport, load_report, merge_reports
from prifed.fhir.reader import MAX_RESOURCE_BYTES
from prifed.fhir.spec import load_spec, spec_hash

data_app = typer.Typer(
    help="Turn FHIR R4 records into the federation's feature table.",
    no_args_is_help=True, add_completion=False,
)
_console = Console(stderr=True)


def _summary(report: QualityReport, output: Path) -> Table:
    table = Table(title=f"site {report.site}: {output}", show_header=True)
    table.add_column("count")
    table.add_column("value", justify="right")
    table.add_row("files read", str(report.files_read))
    table.add_row("resources read", str(report.total_read))
    for reason, count in report.rejections_by_reason().items():
        table.add_row(f"rejected: {reason}", str(count))
    table.add_row("patients read", str(report.patients.read))
    for reason, count in report.patients.excluded.items():
        table.add_row(f"patients excluded: {reason}", str(count))
    table.add_row("rows written", str(report.patients.in_table))
    table.add_row("label positive", str(report.label.positive))
    for name, counts in report.features.items():
        table.add_row(f"feature {name}: present / missing",
                      f"{counts.present} / {counts.missing}")
    return table


@data_app.command("from-fhir")
def from_fhir(
    source: Annotated[Path, typer.Argument(
        help="FHIR export: a folder of bundles (.json) or bulk NDJSON files "
             "(.ndjson), optionally .gz, or one such file")],
    spec: Annotated[Path, typer.Option(
        help="feature specification file (.toml, .yaml or .json)")],
    site: Annotated[str, typer.Option(help="site name written to the site column")],
    output: Annotated[Path, typer.Option(help="CSV feature table to write")],
    report: Annotated[Path | None, typer.Option(
        help="JSON quality report to write (aggregate counts only, shareable)")
    ] = None,
    rejections: Annotated[Path | None, typer.Option(
        help="CSV log of rejected records with resource ids; keep it at the site")
    ] = None,
    work_dir: Annotated[Path | None, typer.Option(
        help="folder for the temporary on-disk spill (default: system temp)")
    ] = None,
    max_resource_bytes: Annotated[int, typer.Option(
        min=1, help="largest NDJSON line, resource file or Bundle entry to read, "
                    "in bytes; larger ones are rejected as resource_too_large")
    ] = MAX_RESOURCE_BYTES,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="log progress to the console")
                       ] = False,
) -> None:
    """Convert a site's FHIR export into the feature table of a specification."""
    package_logger = logging.getLogger("prifed")
    handler = RichHandler(console=_console, show_path=False, markup=False)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    previous_level = package_logger.level
    package_logger.setLevel(logging.INFO)
    package_logger.addHandler(handler)
    try:
        result = write_site_table(source, spec, site, output, report_path=report,
                                  work_dir=work_dir, rejections=rejections,
                                  max_resource_bytes=max_resource_bytes)
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
    _console.print(_summary(result, output))
    if report is not None:
        _console.print(f"quality report: {report}")


@data_app.command("spec-hash")
def spec_hash_command(
    spec: Annotated[Path, typer.Argument(help="feature specification file")],
) -> None:
    """Print the SHA-256 hash that updates made under a specification carry."""
    parsed = load_spec(spec)
    typer.echo(spec_hash(parsed))


@data_app.command("merge-reports")
def merge_reports_command(
    reports: Annotated[list[Path], typer.Argument(help="site quality reports (JSON)")],
    expected_hash: Annotated[str | None, typer.Option(
        help="specification hash every site must have used")] = None,
    output: Annotated[Path | None, typer.Option(
        help="JSON file for the federation-wide table")] = None,
) -> None:
    """Gather site quality reports into one federation-wide table."""
    check_outputs([("--output", output)], inputs=reports)
    federation = merge_reports([load_report(path) for path in reports],
                               expected_hash=expected_hash)
    typer.echo(federation.format_text())
    if output is not None:
        with atomic_text(output, "--output") as handle:
            handle.write(json.dumps(federation.to_dict(), indent=2) + "\n")


@data_app.command("stack")
def stack_command(
    tables: Annotated[list[Path], typer.Argument(help="site feature tables (CSV)")],
    output: Annotated[Path, typer.Option(help="CSV file to write")],
) -> None:
    """Stack site tables with the same columns into one table for a simulation.

    Real sites keep their tables; one stacked file serves ``prifed simulate``.
    """
    check_outputs([("--output", output)], inputs=tables)
    for path in tables:
        if not path.is_file():
            raise DataError(f"table {path} not found or not a file")
    with atomic_text(output, "--output") as handle:
        count = _stack(tables, csv.writer(handle))
    typer.echo(f"wrote {output}: {count} sites")


def _stack(tables: list[Path], writer: Any) -> int:
    header: list[str] | None = None
    sites: dict[str, int] = {}
    for number, path in enumerate(tables):
        try:
            source = path.open(newline="", encoding="utf-8")
        except OSError as error:
            raise DataError(f"cannot read table {path}: {error.strerror}") from None
        try:
            with source:
                reader = csv.reader(source)
                columns = next(reader, None)
                if columns is None or "site" not in columns:
                    raise DataError(f"table {path} has no header with a site column")
                if header is None:
                    header = columns
                    writer.writerow(header)
                elif columns != header:
                    raise DataError(
                        f"table {path} has columns {columns}; expected {header}")
                position = columns.index("site")
                for row in reader:
                    if len(row) != len(columns):
                        raise DataError(
                            f"table {path} line {reader.line_num} has {len(row)} "
                            f"fields; expected {len(columns)}")
                    owner = sites.setdefault(row[position], number)
                    if owner != number:
                        raise DataError(
                            f"site {row[position]!r} appears in both "
                            f"{tables[owner]} and {path}")
                    writer.writerow(row)
        except (UnicodeDecodeError, csv.Error) as error:
            raise DataError(f"table {path} is not a UTF-8 CSV file: {error}") from None
    return len(sites)
