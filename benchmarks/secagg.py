"""Benchmark secure aggregation against plain aggregation of the same round.

Run: .venv/bin/python benchmarks/secagg.py [--quick] [--json FILE]

For each setting (sites, values per update, dropout rate, full graph or
SecAgg+) one round runs in process, every message framed as bytes. Dropped
sites are split evenly: half stop after sharing keys (before upload), half
after uploading their masked input (before unmask). Reported per setting:

- site ms: mean time a site spends in the protocol (encoding, masking,
  sharing, packing), against serialising its update to safetensors;
- coordinator s: time in the coordinator's protocol code, against
  deserialising every update and taking the weighted mean;
- bytes/site: mean bytes a site sends plus receives during the protocol,
  against the plain safetensors update it would upload. The global model
  broadcast is the same in both and is left out.

The sites run one after another on one core, so a round's wall time is about
the sum of all sites' times plus the coordinator's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from prifed.core.aggregate import WeightedMean
from prifed.core.params import ParameterSet, params_from_bytes, params_to_bytes
from prifed.core.secure_sum import PrivateSumAborted
from prifed.secagg import SecAggConfig, run_secagg_round
from prifed.secagg.messages import MASKED_INPUT, UNMASK

SITES = (10, 50, 200)
VALUES = (10_000, 1_000_000)
DROPOUTS = (0.0, 0.1, 0.3)
MODES = ("secagg", "secagg+")


@dataclass
class Row:
    """Figures of one setting."""

    mode: str
    sites: int
    values: int
    dropout: float
    status: str
    site_ms: float = 0.0
    plain_site_ms: float = 0.0
    coordinator_s: float = 0.0
    plain_coordinator_s: float = 0.0
    bytes_per_site: float = 0.0
    upload_bytes: float = 0.0
    plain_bytes: float = 0.0
    bits: int = 0
    wall_s: float = 0.0


def make_updates(sites: int, values: int, seed: int
                 ) -> tuple[ParameterSet, dict[str, ParameterSet], dict[str, int]]:
    """Return a one-tensor global model, per-site models and sample counts."""
    rng = np.random.default_rng(seed)
    reference = {"weight": rng.standard_normal(values, dtype=np.float32)}
    updates = {}
    for i in range(sites):
        noise = rng.standard_normal(values, dtype=np.float32)
        updates[f"site-{i:03d}"] = {"weight": reference["weight"] + 0.01 * noise}
    samples = {site: int(rng.integers(50, 500)) for site in updates}
    return reference, updates, samples


def plain_round(reference: ParameterSet, updates: dict[str, ParameterSet],
                samples: dict[str, int]) -> tuple[float, float, float]:
    """Time plain aggregation: per-site serialise, coordinator parse and mean."""
    site_seconds = 0.0
    blobs = {}
    for site, update in updates.items():
        started = time.perf_counter()
        blobs[site] = params_to_bytes(update)
        site_seconds += time.perf_counter() - started
    started = time.perf_counter()
    mean = WeightedMean(reference)
    for site, blob in blobs.items():
        mean.add(params_from_bytes(blob), float(samples[site]))
    mean.result()
    coordinator = time.perf_counter() - started
    size = float(np.mean([len(blob) for blob in blobs.values()]))
    return site_seconds / len(updates), coordinator, size


def measure(mode: str, sites: int, values: int, dropout: float, threshold: float,
            seed: int) -> Row:
    """Run one secure round and its plain counterpart."""
    reference, updates, samples = make_updates(sites, values, seed)
    # Plain aggregation is fast and noisy, so it runs three times and the
    # fastest run counts, which favours plain aggregation in the ratios.
    plain_runs = [plain_round(reference, updates, samples) for _ in range(3)]
    plain_site = min(run[0] for run in plain_runs)
    plain_coordinator = min(run[1] for run in plain_runs)
    plain_bytes = plain_runs[0][2]
    rng = np.random.default_rng(seed + 1)
    names = list(updates)
    gone = [names[i] for i in rng.choice(sites, round(dropout * sites),
                                         replace=False)]
    half = len(gone) // 2
    dropouts = {MASKED_INPUT: gone[:half], UNMASK: gone[half:]}
    config = SecAggConfig(mode=mode, threshold=threshold)
    row = Row(mode, sites, values, dropout, "ok", plain_site_ms=plain_site * 1e3,
              plain_coordinator_s=plain_coordinator, plain_bytes=plain_bytes)
    started = time.perf_counter()
    try:
        result = run_secagg_round(updates, samples, reference, config,
                                  dropouts=dropouts)
    except PrivateSumAborted as error:
        row.status = f"aborted: {error.reason}"
        row.wall_s = time.perf_counter() - started
        return row
    row.wall_s = time.perf_counter() - started
    stats = result.stats
    active = [site for site in names if site not in gone]
    row.site_ms = float(np.mean([stats.site_seconds[s] for s in active])) * 1e3
    row.coordinator_s = stats.coordinator_seconds
    row.bytes_per_site = float(np.mean([stats.bytes_sent[s] + stats.bytes_received[s]
                                        for s in active]))
    row.upload_bytes = float(np.mean([stats.bytes_sent[s] for s in active]))
    row.bits = config.plan(sites, values).bits
    return row


def settings(quick: bool) -> list[tuple[str, int, int, float]]:
    """List (mode, sites, values, dropout) to run; quick skips the slowest."""
    chosen = []
    for mode, sites, values, dropout in itertools.product(MODES, SITES, VALUES,
                                                          DROPOUTS):
        # The full graph at 200 sites and 1M values expands 40,000 masks of
        # 8 MB each; it runs only in the full sweep.
        if quick and mode == "secagg" and sites == 200 and values == 1_000_000:
            continue
        chosen.append((mode, sites, values, dropout))
    return chosen


def print_row(row: Row) -> None:
    """Print one setting with its ratios to plain aggregation."""
    head = f"{row.mode:8} n={row.sites:<4} m={row.values:<8} drop={row.dropout:<4}"
    if row.status != "ok":
        print(f"{head} {row.status}", flush=True)
        return
    site = row.site_ms / row.plain_site_ms
    coordinator = row.coordinator_s / row.plain_coordinator_s
    total = row.bytes_per_site / row.plain_bytes
    upload = row.upload_bytes / row.plain_bytes
    print(f"{head} bits={row.bits} site {row.site_ms:8.1f} ms ({site:6.1f}x) | "
          f"coordinator {row.coordinator_s:7.3f} s ({coordinator:5.2f}x) | "
          f"bytes/site {row.bytes_per_site / 1e6:7.3f} MB ({total:5.2f}x, upload "
          f"{upload:4.2f}x) | wall {row.wall_s:6.1f} s",
          flush=True)


def main() -> None:
    """Run the sweep and print one line per setting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="skip the full graph at 200 sites and 1M values")
    parser.add_argument("--threshold", type=float, default=0.34,
                        help="threshold as a fraction of each site's share holders")
    parser.add_argument("--sites", type=int, nargs="*", default=list(SITES))
    parser.add_argument("--values", type=int, nargs="*", default=list(VALUES))
    parser.add_argument("--dropouts", type=float, nargs="*", default=list(DROPOUTS))
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = []
    for mode, sites, values, dropout in settings(args.quick):
        if (mode not in args.modes or sites not in args.sites
                or values not in args.values or dropout not in args.dropouts):
            continue
        rows.append(measure(mode, sites, values, dropout, args.threshold, args.seed))
        print_row(rows[-1])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(row) for row in rows], handle, indent=1)


if __name__ == "__main__":
    main()
