"""Benchmark CKKS homomorphic aggregation against plain aggregation.

Run: .venv/bin/python benchmarks/he.py [--quick] [--json FILE]

Two workloads, each run in one process on the CPU:

- the four-centre heart job as ``prifed simulate`` runs it: logistic
  regression with 14 parameters, the simulation's default rounds and local
  steps, with FedAvg and (when the plain strategies are installed) FedAdam.
  It runs through the round engine once with plain aggregation and once with
  CKKS, and the end-to-end time includes creating the key and each site
  loading its context. Medians over the repeats;
- one round of a 1,000,000-value float32 update from each of 4 sites.

Reported, each beside the plain figure and as a ratio to it:

- site encrypt / decrypt ms: a site's time to clip, weight and encrypt its
  update (plain: serialise it to safetensors), and to decrypt the aggregate
  (plain: parse the new model from safetensors), per round;
- coordinator ms: the coordinator's time per round to parse and add the
  ciphertexts and serialise the sum (plain: parse each update and take the
  weighted mean);
- bytes/site: what a site uploads per round (plain: its safetensors update);
- end-to-end s: wall time of the whole run (heart) or of the round (1M:
  every site encrypts, the coordinator adds, every site decrypts, one after
  another). For the heart job the CKKS work of a run (key, contexts,
  encryption, decryption, additions) is also summed, because on a busy
  machine the training time varies more than that work.

Local training uses one torch thread by default: with two threads on a
loaded 2-core machine a step of the 14-parameter model took up to 100 times
longer, which would hide the figures being measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from prifed.core.aggregate import WeightedMean
from prifed.core.engine import RoundEngine, RoundRecord
from prifed.core.params import ParameterSet, params_from_bytes, params_to_bytes
from prifed.he.combine import EncryptedSum
from prifed.he.keys import coordinator_key, create_federation_key
from prifed.he.packing import Layout
from prifed.he.params import select_params
from prifed.he.simulate import HomomorphicSettings, final_model, homomorphic_federation
from prifed.he.site import decrypt_aggregate, encrypt_update
from prifed.he.strategy import HomomorphicStrategy
from prifed.simulation import SimulationConfig
from prifed.sitedata import prepare_sites
from prifed.strategies import STRATEGIES, build_strategy
from prifed.training.client import SiteClient
from prifed.training.models import build_model, get_params, trainable_names
from prifed.transport.inprocess import InProcessTransport


@dataclass
class Figures:
    """One workload's figures, CKKS beside plain."""

    workload: str
    sites: int
    values: int
    encrypt_ms: float
    plain_encode_ms: float
    decrypt_ms: float
    plain_decode_ms: float
    coordinator_ms: float
    plain_coordinator_ms: float
    bytes_per_site: float
    plain_bytes_per_site: float
    end_to_end_s: float
    plain_end_to_end_s: float
    he_work_s: float = float("nan")
    he_setup_s: float = float("nan")
    accuracy: float = float("nan")
    plain_accuracy: float = float("nan")
    max_error: float = float("nan")
    params: str = ""


def heart_run(strategy_name: str, homomorphic: bool, seed: int) -> dict[str, Any]:
    """Run the heart job once; return timings, bytes and the final accuracy."""
    config = SimulationConfig(seed=seed)
    started = time.perf_counter()
    sites = prepare_sites(None, None, seed, config.test_fraction, config.standardize)
    num_features = sites[0].train_x.shape[1]

    def factory() -> Any:
        return build_model(config.model, num_features, seed)

    clients: list[Any] = [SiteClient(s.name, factory, s.train_x, s.train_y, s.test_x,
                                     s.test_y, seed + i) for i, s in enumerate(sites)]
    strategy: Any = build_strategy(strategy_name, local_config=config.local_config())
    initial = factory()
    params, trainable = get_params(initial), trainable_names(initial)
    setup = 0.0
    if homomorphic:
        setup_started = time.perf_counter()
        strategy, clients = homomorphic_federation(
            strategy, {}, clients, params, trainable, HomomorphicSettings())
        setup = time.perf_counter() - setup_started
    decrypt: list[float] = []
    coordinator: list[float] = []

    def on_round(record: RoundRecord) -> None:
        if isinstance(strategy, HomomorphicStrategy):
            assert strategy.round_sum is not None
            coordinator.append(strategy.round_sum.seconds)
            decrypt.extend(c.site.last_decryption.seconds for c in clients
                           if c.site.last_decryption is not None)

    engine = RoundEngine(strategy, InProcessTransport(clients), config.rounds,
                         seed=seed, on_round=on_round)
    final = engine.run(params, trainable)
    if homomorphic:
        final = final_model(clients)
    seconds = time.perf_counter() - started
    last = engine.history[-1].eval_metrics
    accuracy = statistics.mean(m["accuracy"] for m in last.values())
    metrics = [m for r in engine.history for m in r.train_metrics.values()]
    if homomorphic:
        work = setup + sum(m["he_encrypt_seconds"] for m in metrics) \
            + sum(decrypt) + sum(coordinator)
        return {"seconds": seconds, "accuracy": accuracy, "work": work,
                "setup": setup,
                "encrypt": statistics.mean(m["he_encrypt_seconds"] for m in metrics),
                "bytes": statistics.mean(m["he_bytes"] for m in metrics),
                "decrypt": statistics.mean(decrypt),
                "coordinator": statistics.mean(coordinator),
                "params": str(clients[0].site.key.params.to_dict()),
                "final": final}
    return {"seconds": seconds, "accuracy": accuracy, "final": final,
            **plain_costs([final] * len(clients))}


def plain_costs(updates: list[ParameterSet]) -> dict[str, float]:
    """Time plain serialisation, parsing and averaging of one round's updates."""
    started = time.perf_counter()
    blobs = [params_to_bytes(u) for u in updates]
    encode = (time.perf_counter() - started) / len(updates)
    started = time.perf_counter()
    mean = WeightedMean(updates[0])
    for blob in blobs:
        mean.add(params_from_bytes(blob), 1.0)
    result = params_to_bytes(mean.result())
    coordinator = time.perf_counter() - started
    started = time.perf_counter()
    params_from_bytes(result)
    decode = time.perf_counter() - started
    return {"encrypt": encode, "decrypt": decode, "coordinator": coordinator,
            "bytes": float(np.mean([len(b) for b in blobs]))}


def heart(strategy_name: str, repeats: int, seed: int) -> Figures:
    """Median figures of the heart job, plain against CKKS."""
    plain, sealed = [], []
    # Alternate the two, so a change in machine load affects both alike.
    for _ in range(repeats):
        plain.append(heart_run(strategy_name, False, seed))
        sealed.append(heart_run(strategy_name, True, seed))

    def median(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    error = max(float(np.abs(sealed[0]["final"][k].astype(np.float64)
                             - plain[0]["final"][k]).max()) for k in plain[0]["final"])
    return Figures(
        f"heart {strategy_name}", 4, sum(v.size for v in plain[0]["final"].values()),
        1e3 * median(sealed, "encrypt"), 1e3 * median(plain, "encrypt"),
        1e3 * median(sealed, "decrypt"), 1e3 * median(plain, "decrypt"),
        1e3 * median(sealed, "coordinator"), 1e3 * median(plain, "coordinator"),
        median(sealed, "bytes"), median(plain, "bytes"),
        median(sealed, "seconds"), median(plain, "seconds"),
        median(sealed, "work"), median(sealed, "setup"),
        median(sealed, "accuracy"), median(plain, "accuracy"), error,
        sealed[0]["params"])


def million(num_sites: int, values: int, seed: int) -> Figures:
    """Figures of one round of ``values``-value updates from ``num_sites`` sites."""
    rng = np.random.default_rng(seed)
    weights = [float(w) for w in rng.integers(50, 300, num_sites)]
    updates = [{"w": rng.normal(0, 0.01, values).astype(np.float32)}
               for _ in range(num_sites)]
    key = create_federation_key(select_params(num_sites, 1.0, 1e-6, 1e4))
    coordinator = coordinator_key(key)
    layout = Layout.of(updates[0], key.params.slots)

    round_started = time.perf_counter()
    encrypted, encrypt_times = [], []
    for index, update in enumerate(updates):
        started = time.perf_counter()
        sealed, _ = encrypt_update(key, layout, f"site-{index}", 1, update,
                                   weights[index], "b0")
        encrypted.append(sealed.to_params())
        encrypt_times.append(time.perf_counter() - started)
    started = time.perf_counter()
    combiner = EncryptedSum(coordinator, layout, 1)
    for index, sealed_params in enumerate(encrypted):
        combiner.add_params(f"site-{index}", sealed_params)
    aggregate = combiner.result()
    coordinator_seconds = time.perf_counter() - started
    decrypt_times = []
    for index in range(num_sites):
        started = time.perf_counter()
        mean = decrypt_aggregate(key, layout, f"site-{index}", aggregate).mean["w"]
        decrypt_times.append(time.perf_counter() - started)
    end_to_end = time.perf_counter() - round_started

    reference = np.average(np.stack([u["w"].astype(np.float64) for u in updates]),
                           axis=0, weights=weights)
    plain_started = time.perf_counter()
    plain = plain_costs(updates)
    for _ in range(num_sites - 1):
        params_from_bytes(params_to_bytes({"w": reference.astype(np.float32)}))
    plain_end_to_end = time.perf_counter() - plain_started
    upload = statistics.mean(sum(v.size for v in p.values()) for p in encrypted)
    return Figures(
        f"{values:,} values", num_sites, values,
        1e3 * statistics.mean(encrypt_times), 1e3 * plain["encrypt"],
        1e3 * statistics.mean(decrypt_times), 1e3 * plain["decrypt"],
        1e3 * coordinator_seconds, 1e3 * plain["coordinator"], float(upload),
        plain["bytes"], end_to_end, plain_end_to_end,
        max_error=float(np.abs(mean - reference).max()),
        params=str(key.params.to_dict()))


def print_table(rows: list[Figures]) -> None:
    """Print each figure beside its plain counterpart and their ratio."""
    pairs: list[tuple[str, Callable[[Figures], tuple[float, float]], str]] = [
        ("site encrypt ms", lambda r: (r.encrypt_ms, r.plain_encode_ms), ".2f"),
        ("site decrypt ms", lambda r: (r.decrypt_ms, r.plain_decode_ms), ".2f"),
        ("coordinator ms", lambda r: (r.coordinator_ms, r.plain_coordinator_ms),
         ".2f"),
        ("bytes/site", lambda r: (r.bytes_per_site, r.plain_bytes_per_site), ",.0f"),
        ("end-to-end s", lambda r: (r.end_to_end_s, r.plain_end_to_end_s), ".3f"),
    ]
    for row in rows:
        print(f"\n{row.workload}, {row.sites} sites, {row.values:,} values")
        print(f"  CKKS parameters: {row.params}")
        print(f"  {'':18}{'CKKS':>14}{'plain':>14}{'ratio':>9}")
        for label, pick, fmt in pairs:
            sealed, plain = pick(row)
            ratio = sealed / plain if plain else float("nan")
            print(f"  {label:18}{sealed:>14{fmt}}{plain:>14{fmt}}{ratio:>8.1f}x")
        float32 = 4 * row.values
        print(f"  bytes/site as a multiple of the float32 update: "
              f"{row.bytes_per_site / float32:.1f}x")
        if not np.isnan(row.he_work_s):
            added = (row.plain_end_to_end_s + row.he_work_s) / row.plain_end_to_end_s
            print(f"  CKKS work per run: {row.he_work_s:.3f} s (key and contexts "
                  f"{row.he_setup_s:.3f} s); plain run plus that work: {added:.2f}x")
        if not np.isnan(row.accuracy):
            print(f"  mean test accuracy: CKKS {row.accuracy:.4f}, plain "
                  f"{row.plain_accuracy:.4f}")
        print(f"  max |CKKS - plain| of the aggregate: {row.max_error:.2g}")


def main() -> None:
    """Run the workloads and print the table (and JSON when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one repeat and 100,000 values instead of 1,000,000")
    parser.add_argument("--repeats", type=int, default=3,
                        help="heart-job repeats; the median is reported")
    parser.add_argument("--sites", type=int, default=4,
                        help="sites in the large-update round")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads for local training (0: torch's default)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    repeats = 1 if args.quick else args.repeats
    values = 100_000 if args.quick else 1_000_000

    rows = [heart("fedavg", repeats, args.seed)]
    if "fedadam" in STRATEGIES:
        rows.append(heart("fedadam", repeats, args.seed))
    rows.append(million(args.sites, values, args.seed))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in rows], handle, indent=2)


if __name__ == "__main__":
    main()
