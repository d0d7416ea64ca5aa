"""Benchmark the main job: framework overhead and FedAvg accuracy against FLamby.

Run: .venv/bin/python benchmarks/foundation.py [--seeds 5]

Overhead is the share of the federated run's wall time spent outside the
sites' local training and evaluation (model loading included in those).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from prifed.simulation import SimulationConfig, mean_metrics, run_simulation

FLAMBY = {"fedavg": 0.698, "pooled": 0.747}


def overhead(repeats: int) -> None:
    """Print the overhead share of the default job, cold and warm."""
    shares = []
    for repeat in range(repeats):
        started = time.perf_counter()
        result = run_simulation(SimulationConfig(baselines=False))
        wall = time.perf_counter() - started
        federated = result.methods[0].seconds
        shares.append(1 - result.compute_seconds / federated)
        print(f"run {repeat + 1}: federated {federated:.3f} s, site compute "
              f"{result.compute_seconds:.3f} s, whole call {wall:.3f} s, "
              f"overhead {shares[-1]:.1%}")
    print(f"overhead: first run {shares[0]:.1%}, later runs median "
          f"{np.median(shares[1:]):.1%}")


def accuracy(seeds: list[int], lr: float) -> None:
    """Print mean test accuracy per method over seeds."""
    per_method: dict[str, list[float]] = {}
    for seed in seeds:
        result = run_simulation(SimulationConfig(seed=seed, lr=lr))
        for method in result.methods:
            value = mean_metrics(method.final)["accuracy"]
            per_method.setdefault(method.method, []).append(value)
    for method, values in per_method.items():
        reference = FLAMBY.get(method)
        ref_text = f" (FLamby {reference:.3f})" if reference else ""
        print(f"lr {lr}: {method:7s} mean accuracy {np.mean(values):.3f} "
              f"+- {np.std(values):.3f} over seeds {seeds}{ref_text}")
    gap = np.mean(per_method["pooled"]) - np.mean(per_method["fedavg"])
    print(f"lr {lr}: FedAvg is {gap:+.3f} below pooled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    overhead(args.repeats)
    seeds = list(range(42, 42 + args.seeds))
    accuracy(seeds, 0.01)
    accuracy(seeds, 0.001)


if __name__ == "__main__":
    main()
