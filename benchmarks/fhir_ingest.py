"""Benchmark: FHIR bulk NDJSON to feature table, speed and peak memory.

Builds bulk exports of several sizes by replicating the example site
``examples/fhir/east`` (120 patients, about 4,700 resources, one NDJSON file
per resource type) with fresh ids per copy. Each export is converted with
``prifed.fhir.write_site_table`` in a fresh process pinned to one CPU core.
Prints wall and CPU seconds, resources per CPU second and the process's peak
resident memory, before the import (imports and models loaded) and after it,
so the growth with export size is visible. CPU seconds are the figure to
compare on a shared machine, where other processes stretch wall time.

    python benchmarks/fhir_ingest.py                  # 25k, 100k, 200k resources
    python benchmarks/fhir_ingest.py --sizes 100000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "fhir" / "east"
SPEC = ROOT / "examples" / "fhir" / "spec.toml"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def build_export(folder: Path, resources: int) -> int:
    """Write an NDJSON export of at least ``resources`` resources; return the count."""
    streams = {}
    for path in sorted(SOURCE.glob("*.ndjson.gz")):
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
        streams[path.name.removesuffix(".gz")] = [line for line in lines if line]
    per_copy = sum(len(lines) for lines in streams.values())
    copies = -(-resources // per_copy)

    handles = {name: (folder / name).open("w", encoding="utf-8") for name in streams}
    try:
        for copy in range(copies):
            replacement = rf"\g<0>-{copy:05d}"
            for name, lines in streams.items():
                handle = handles[name]
                for line in lines:
                    handle.write(_UUID.sub(replacement, line) + "\n")
    finally:
        for handle in handles.values():
            handle.close()
    return copies * per_copy


def cpu_seconds() -> float:
    """Return the user and system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    """Return this process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(folder: str) -> None:
    """Convert one export in this process and print a JSON line of figures."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from prifed.fhir import write_site_table
    from prifed.fhir.extract import _model

    for name in ("Patient", "Observation", "Condition", "Encounter"):
        _model(name)  # build the R4B models before the baseline is taken
    baseline = peak_rss_mib()
    with tempfile.TemporaryDirectory() as work:
        started, cpu_started = time.perf_counter(), cpu_seconds()
        report = write_site_table(folder, SPEC, "bench", Path(work) / "table.csv",
                                  work_dir=work)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds() - cpu_started
    print(json.dumps({
        "resources": report.total_read, "patients": report.patients.read,
        "rows": report.patients.in_table, "seconds": seconds, "cpu_seconds": cpu,
        "baseline_mib": baseline, "peak_mib": peak_rss_mib(),
    }))


def main() -> None:
    """Build each export, measure it in a child process and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="25000,100000,200000",
                        help="comma-separated export sizes in resources")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure)
        return

    print(f"python {sys.version.split()[0]}, one core, source {SOURCE.name}")
    print(f"{'resources':>10} {'patients':>9} {'wall s':>7} {'CPU s':>6} "
          f"{'res/CPU s':>9} {'base MiB':>9} {'peak MiB':>9} {'growth':>7}")
    for size in (int(text) for text in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as folder:
            build_export(Path(folder), size)
            output = subprocess.run(
                [sys.executable, __file__, "--measure", folder],
                check=True, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            ).stdout
        figures = json.loads(output.strip().splitlines()[-1])
        rate = figures["resources"] / figures["cpu_seconds"]
        growth = figures["peak_mib"] - figures["baseline_mib"]
        print(f"{figures['resources']:>10} {figures['patients']:>9} "
              f"{figures['seconds']:>7.1f} {figures['cpu_seconds']:>6.1f} "
              f"{rate:>9.0f} "
              f"{figures['baseline_mib']:>9.0f} {figures['peak_mib']:>9.0f} "
              f"{growth:>7.0f}")


if __name__ == "__main__":
    main()
