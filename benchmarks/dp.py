"""Differential privacy on the four-centre heart job: accuracy, attack AUC, time.

For each seed, trains FedAvg on the shipped heart data without DP, with
record-level DP-SGD and with site-level DP-FedAvg at each target epsilon
(delta 1e-3), then prints the mean test accuracy over the four centres next
to FLamby's published DP-SGD figures, the loss-threshold membership-inference
AUC of the final model, and the wall time per round.

The heart job is FLamby's protocol with PriFed's defaults: logistic
regression, 15 rounds of 100 SGD steps with batch 4 and learning rate 0.01,
federated standardisation. A second part, the attack check, trains a model
that memorises (an MLP with 256 hidden units and Adam, 30 rounds) so that the
attack has something to find without DP.

    .venv/bin/python benchmarks/dp.py         # both parts, about 40 min on 2 cores
    .venv/bin/python benchmarks/dp.py --parts attack --attack-seeds 42,43,44,45,46
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prifed.core.engine import RoundEngine, RoundRecord
from prifed.core.strategy import FedAvg
from prifed.privacy.attack import attack_sites, mean_site_auc
from prifed.privacy.federation import PrivacyOptions, run_private
from prifed.sitedata import PreparedSite, prepare_sites
from prifed.training.client import SiteClient
from prifed.training.metrics import nanmean
from prifed.training.models import MLP, LogisticRegression, get_params, set_params, \
    trainable_names
from prifed.transport.inprocess import InProcessTransport

FLAMBY = {"none": 0.712, 1.0: 0.702, 0.1: 0.606}
"""FLamby's Fed-Heart-Disease accuracy with DP-SGD (mean of centres, 5 seeds)."""

DELTA = 1e-3
HEART = {"rounds": 15, "local": {"local_steps": 100, "batch_size": 4, "lr": 0.01,
                                  "optimizer": "sgd"}}
ATTACK = {"rounds": 30, "local": {"local_steps": 100, "batch_size": 4, "lr": 0.01,
                                   "optimizer": "adam"}}
CLIP = {"record": 1.0, "site": 0.1}
"""L2 clip norms: per-record gradients, and per-site updates (about the median
norm of non-private updates on this job, 0.07 to 0.5 over rounds)."""


def mean_accuracy(per_site: dict[str, dict[str, float]]) -> float:
    return nanmean([m["accuracy"] for m in per_site.values()])


def logreg(seed: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return LogisticRegression(13)
    return build


def wide_mlp(seed: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return MLP(13, hidden=256)
    return build


def run_plain(sites: list[PreparedSite], factory: Callable[[], nn.Module],
              job: dict[str, Any], seed: int) -> tuple[nn.Module, list[RoundRecord]]:
    clients = [SiteClient(s.name, factory, s.train_x, s.train_y, s.test_x, s.test_y,
                          seed + i) for i, s in enumerate(sites)]
    engine = RoundEngine(FedAvg(local_config=job["local"]),
                         InProcessTransport(clients), job["rounds"], seed=seed)
    model = factory()
    final = engine.run(get_params(model), trainable_names(model))
    set_params(model, final)
    return model, engine.history


def run_dp(sites: list[PreparedSite], factory: Callable[[], nn.Module],
           job: dict[str, Any], seed: int, mode: str, epsilon: float
           ) -> tuple[nn.Module, list[RoundRecord], float]:
    with tempfile.TemporaryDirectory() as root:
        options = PrivacyOptions(mode=mode, epsilon=epsilon, delta=DELTA,
                                 clip_norm=CLIP[mode], site_root=root)
        run = run_private(FedAvg(local_config=job["local"]), sites, factory,
                          job["rounds"], seed, options)
    model = factory()
    set_params(model, run.model)
    spent = max(m["dp_epsilon"] for r in run.history for m in r.train_metrics.values())
    return model, run.history, spent


def measure(sites: list[PreparedSite], factory: Callable[[], nn.Module],
            job: dict[str, Any], seed: int, mode: str, epsilon: float | None
            ) -> dict[str, float]:
    if epsilon is None:
        model, history = run_plain(sites, factory, job, seed)
        spent = 0.0
    else:
        model, history, spent = run_dp(sites, factory, job, seed, mode, epsilon)
    attack = attack_sites(model, sites)
    return {"accuracy": mean_accuracy(history[-1].eval_metrics),
            "mia_auc": mean_site_auc(attack),
            "mia_auc_pooled": attack[-1].auc,
            "round_seconds": statistics.mean(r.seconds for r in history),
            "epsilon_spent": spent}


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        out[key] = statistics.mean(values)
        out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def run_grid(job: dict[str, Any], factory_of: Callable[[int], Callable[[], nn.Module]],
             seeds: list[int], epsilons: list[float], modes: list[str]
             ) -> dict[str, dict[str, float]]:
    results: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        sites = prepare_sites(None, None, seed)
        cases: list[tuple[str, str, float | None]] = [("no DP", "none", None)]
        cases += [(f"{mode} eps {eps:g}", mode, eps) for mode in modes
                  for eps in epsilons]
        for label, mode, epsilon in cases:
            started = time.perf_counter()
            row = measure(sites, factory_of(seed), job, seed, mode, epsilon)
            results.setdefault(label, []).append(row)
            print(f"  seed {seed} {label}: accuracy {row['accuracy']:.3f}, attack "
                  f"AUC {row['mia_auc']:.3f} ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    return {label: summarise(rows) for label, rows in results.items()}


def print_table(title: str, summary: dict[str, dict[str, float]],
                flamby: bool) -> None:
    print(f"\n{title}")
    header = (f"{'setting':<18} {'accuracy':>15} {'FLamby':>7} {'attack AUC':>15} "
              f"{'pooled AUC':>11} {'s/round':>8} {'extra s/round':>14}")
    print(header)
    print("-" * len(header))
    base = summary["no DP"]["round_seconds"]
    for label, row in summary.items():
        key: Any = "none" if label == "no DP" else float(label.split()[-1])
        reference = f"{FLAMBY[key]:.3f}" if flamby and key in FLAMBY else ""
        if flamby and label.startswith("site"):
            reference = ""
        print(f"{label:<18} {row['accuracy']:>7.3f} ± {row['accuracy_std']:.3f} "
              f"{reference:>7} {row['mia_auc']:>7.3f} ± {row['mia_auc_std']:.3f} "
              f"{row['mia_auc_pooled']:>11.3f} {row['round_seconds']:>8.3f} "
              f"{row['round_seconds'] - base:>+14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="42,43,44,45,46")
    parser.add_argument("--attack-seeds", default="42,43,44")
    parser.add_argument("--epsilons", default="0.5,1,3,8")
    parser.add_argument("--attack-epsilons", default="1,8")
    parser.add_argument("--parts", default="heart,attack",
                        help="comma-separated parts to run: heart, attack")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    def numbers(text: str, kind: Callable[[str], Any]) -> list[Any]:
        return [kind(x) for x in text.split(",") if x]

    parts = set(args.parts.split(","))
    figures: dict[str, Any] = {}
    print(f"PriFed DP benchmark, delta {DELTA:g}, torch on one thread; accuracy is "
          "the plain mean of the four centres' test accuracy (mean ± std over "
          "seeds); attack AUC is the mean over centres of the loss-threshold "
          "attack's AUC, pooled AUC the attack on all centres' records at once")
    if "heart" in parts:
        print(f"heart job: FedAvg, logistic regression, {HEART['rounds']} rounds, "
              f"seeds {args.seeds}", file=sys.stderr)
        figures["heart"] = run_grid(HEART, logreg, numbers(args.seeds, int),
                                    numbers(args.epsilons, float), ["record", "site"])
        print_table(f"Heart job (logistic regression, FLamby's protocol, lr 0.01), "
                    f"seeds {args.seeds}", figures["heart"], True)
    if "attack" in parts:
        print(f"attack check: MLP 256 hidden, Adam, {ATTACK['rounds']} rounds, seeds "
              f"{args.attack_seeds}", file=sys.stderr)
        figures["attack"] = run_grid(ATTACK, wide_mlp, numbers(args.attack_seeds, int),
                                     numbers(args.attack_epsilons, float),
                                     ["record", "site"])
        print_table(f"Attack check (MLP 256 hidden, Adam lr 0.01, 30 rounds), seeds "
                    f"{args.attack_seeds}", figures["attack"], False)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
