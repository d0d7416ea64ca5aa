"""Benchmark the strategies on the four-centre heart job, beside FLamby's figures.

Run: .venv/bin/python benchmarks/strategies.py [--seeds 42,43,44,45,46]
     [--jobs 2] [--json results.json]

The protocol is FLamby's Fed-Heart-Disease (see docs/strategies.md). It uses
logistic regression, per-centre standardisation, local SGD lr 0.001, batch
4, 100 local steps per round, 15 rounds and weights by training rows. The
baselines use Adam lr 0.001. Each seed sets the train/test split of every centre, the
initial model and the shuffled streams. Every federated method gets the same
training budget: 15 rounds of 100 steps at each of the 4 centres (FedBuff: 60
site tasks).

Tuning is nested and never sees a test row. For each seed, 25 % of every
centre's training rows (stratified) are held out as validation; each tuned
method tries the same number of settings (5) trained on the remaining rows,
and the setting with the best mean validation accuracy over the tuning
seeds (the first three by default) is then retrained on all training rows
of every seed and scored once on the test rows.

Second part: simulated time to a target accuracy with one centre ten times
slower, synchronous FedAvg against asynchronous FedBuff.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from prifed.baselines import train_pooled
from prifed.core.engine import RoundEngine
from prifed.federated import RunSettings, personal_curve, run_federated
from prifed.simclock import SiteProfile, SiteTimeline, TimedTransport, \
    time_to_target
from prifed.sitedata import PreparedSite, prepare_sites
from prifed.strategies import StrategySpec, build_strategy
from prifed.training.client import SiteClient
from prifed.training.local import LocalTrainer, evaluate_model, make_optimizer
from prifed.training.models import build_model, get_params, trainable_names
from prifed.training.personal import Personalization
from prifed.transport.inprocess import InProcessTransport

SITES = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
LOCAL = {"local_steps": 100, "batch_size": 4, "lr": 0.001, "optimizer": "sgd"}
BASELINE = {"local_steps": 100, "batch_size": 4, "lr": 0.001, "optimizer": "adam"}
ROUNDS = 15
STEP_SECONDS = 0.01

# FLamby's published mean accuracy over the four test sets, 5 seeds. Its
# "local i" is a model trained on centre i alone, scored on all four.
FLAMBY = {"pooled": 0.747, "fedavg": 0.698, "fedprox": 0.698, "scaffold": 0.697,
          "fedadam": 0.736, "fedyogi": 0.741, "fedadagrad": 0.741,
          "local Cleveland": 0.735, "local Hungary": 0.648,
          "local Switzerland": 0.550, "local VA Long Beach": 0.632}


@dataclass(frozen=True)
class Method:
    """A federated method and the settings it may be tuned over."""

    label: str
    strategy: str
    grid: tuple[dict[str, Any], ...] = ({},)
    personal: bool = False
    fixed: dict[str, Any] = field(default_factory=dict)


SERVER_LRS = tuple({"server_lr": v} for v in (0.003, 0.01, 0.03, 0.1, 0.3))
METHODS = (
    Method("fedavg", "fedavg"),
    Method("fedprox", "fedprox", tuple({"mu": v} for v in (0.001, 0.01, 0.1, 1.0,
                                                           10.0))),
    Method("scaffold", "scaffold", tuple({"server_lr": v}
                                         for v in (0.5, 1.0, 2.0, 4.0, 8.0))),
    Method("fedadam", "fedadam", SERVER_LRS),
    Method("fedyogi", "fedyogi", SERVER_LRS),
    Method("fedadagrad", "fedadagrad", SERVER_LRS),
    Method("fedbuff", "fedbuff", tuple({"server_lr": v}
                                       for v in (0.5, 1.0, 2.0, 4.0, 8.0)),
           fixed={"buffer_size": 2}),
    # Personalised FedAvg: each centre keeps its own intercept and fine-tunes
    # the global model with SGD lr 0.01 for a tuned number of steps.
    Method("personalised fedavg", "fedavg",
           tuple({"finetune_steps": v} for v in (0, 50, 100, 200, 400)),
           personal=True),
)


def split_validation(sites: Sequence[PreparedSite], seed: int) -> list[PreparedSite]:
    """Hold out 25 % of each centre's training rows as its validation set."""
    carved = []
    for site in sites:
        labels = site.train_y
        stratify = labels if min(np.bincount(labels.astype(int), minlength=2)) > 2 \
            else None
        train_x, val_x, train_y, val_y = train_test_split(
            site.train_x, labels, test_size=0.25, random_state=seed,
            stratify=stratify)
        carved.append(PreparedSite(site.name, train_x, train_y, val_x, val_y,
                                   site.preprocessor))
    return carved


_SITE_CACHE: dict[tuple[int, bool], list[PreparedSite]] = {}


def sites_for(seed: int, validation: bool) -> list[PreparedSite]:
    """Return the centres of a seed's split, or their train/validation carve."""
    key = (seed, validation)
    if key not in _SITE_CACHE:
        sites = prepare_sites(None, None, seed, standardize="site")
        _SITE_CACHE[key] = split_validation(sites, seed) if validation else sites
    return _SITE_CACHE[key]


def run_method(method: Method, options: dict[str, Any], seed: int,
               validation: bool) -> dict[str, float]:
    """Train one method once; return final accuracy per centre."""
    torch.set_num_threads(1)
    sites = sites_for(seed, validation)
    strategy_options = {**method.fixed,
                        **{k: v for k, v in options.items() if k != "finetune_steps"}}
    personalization = Personalization()
    if method.personal:
        personalization = Personalization(("linear.bias",),
                                          int(options.get("finetune_steps", 0)),
                                          finetune_lr=0.01)
    # Only the last round's scores enter the table.
    settings = RunSettings(ROUNDS, dict(LOCAL), seed,
                           personalization=personalization,
                           step_seconds=STEP_SECONDS, evaluate_every=ROUNDS)
    run = run_federated(StrategySpec(method.strategy, strategy_options), sites,
                        lambda: build_model("logreg", 13, seed), settings)
    curve = personal_curve(run.curve) if method.personal else run.curve
    assert curve is not None
    return {site: float(m["accuracy"]) for site, m in curve[-1].items()}


def run_baselines(seed: int) -> dict[str, dict[str, float]]:
    """Pooled, local (own test set) and local i scored on all four test sets."""
    torch.set_num_threads(1)
    sites = sites_for(seed, False)
    pooled = train_pooled(sites, "logreg", ROUNDS, dict(BASELINE), seed)[-1]
    results = {"pooled": {s: float(m["accuracy"]) for s, m in pooled.items()}}
    own = {}
    for index, site in enumerate(sites):
        model = build_model("logreg", 13, seed)
        trainer = LocalTrainer(site.train_x, site.train_y, seed + 1000 + index)
        optimizer = make_optimizer(model, BASELINE)
        for _ in range(ROUNDS):
            trainer.train(model, BASELINE, optimizer=optimizer)
        scores = {other.name: evaluate_model(model, other.test_x, other.test_y)
                  ["accuracy"] for other in sites}
        results[f"local {site.name}"] = scores
        own[site.name] = scores[site.name]
    results["local (own centre)"] = own
    return results


def time_run(kind: str, seed: int, slow: str, server_lr: float,
             horizon: float) -> dict[str, Any]:
    """Return (simulated time, mean test accuracy) after each server update."""
    torch.set_num_threads(1)
    sites = sites_for(seed, False)
    profiles = {slow: SiteProfile(speed=0.1)}
    factory = lambda: build_model("logreg", 13, seed)  # noqa: E731
    if kind == "async":
        settings = RunSettings(ROUNDS, dict(LOCAL), seed, profiles=profiles,
                               step_seconds=STEP_SECONDS)
        # Enough tasks to cover the synchronous run's simulated time.
        nominal = LOCAL["local_steps"] * STEP_SECONDS
        tasks = int(horizon / nominal * (len(sites) - 1)) + ROUNDS
        rounds = -(-tasks // len(sites))
        run = run_federated(StrategySpec("fedbuff", {"buffer_size": 2,
                                                     "server_lr": server_lr}),
                            sites, factory, replace(settings, rounds=rounds))
        times, curve = run.times, run.curve
        tasks_done = run.history[-1].tasks_done if run.history else 0
    else:
        clients = [SiteClient(s.name, factory, s.train_x, s.train_y, s.test_x,
                              s.test_y, seed + i) for i, s in enumerate(sites)]
        timeline = SiteTimeline([s.name for s in sites], profiles, STEP_SECONDS,
                                LOCAL["local_steps"] * STEP_SECONDS, seed)
        transport = TimedTransport(InProcessTransport(clients), timeline)
        name = "fedavg" if kind == "sync" else "fedbuff"
        options = {} if kind == "sync" else {"server_lr": server_lr}
        strategy = build_strategy(name, local_config=dict(LOCAL), **options)
        times, curve = [], []

        def on_round(record: Any) -> None:
            times.append(transport.clock.now)
            curve.append(record.eval_metrics)

        engine = RoundEngine(strategy, transport, ROUNDS, seed=seed,
                             on_round=on_round)
        model = factory()
        engine.run(get_params(model), trainable_names(model))
        tasks_done = ROUNDS * len(sites)
    means = [float(np.mean([m["accuracy"] for m in point.values()]))
             for point in curve]
    return {"times": times, "means": means, "tasks": tasks_done}


def summarise(values: list[dict[str, float]]) -> dict[str, Any]:
    """Mean and standard deviation per centre and of the mean over centres."""
    table = {site: (float(np.mean([v[site] for v in values])),
                    float(np.std([v[site] for v in values]))) for site in SITES}
    overall = [float(np.mean([v[s] for s in SITES])) for v in values]
    table["mean"] = (float(np.mean(overall)), float(np.std(overall)))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="42,43,44,45,46")
    parser.add_argument("--tune-seeds", default="42,43,44",
                        help="seeds whose validation rows choose the settings")
    parser.add_argument("--parts", default="accuracy,time",
                        help="accuracy (tuning, test table), time (time to target)")
    parser.add_argument("--slow", default="Cleveland",
                        help="comma-separated centres made ten times slower, one "
                             "at a time, for the time-to-target part")
    parser.add_argument("--targets", default="0.70,0.75",
                        help="mean test accuracies for the time-to-target part")
    parser.add_argument("--fedbuff-lr", type=float, default=None,
                        help="FedBuff server lr for the time part (default: the "
                             "tuned one, which needs the accuracy part)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", default=None, help="write all figures here")
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",")]
    parts = {p.strip() for p in args.parts.split(",")}
    report: dict[str, Any] = {"seeds": seeds, "protocol": {
        "local": LOCAL, "baseline": BASELINE, "rounds": ROUNDS}}
    with ProcessPoolExecutor(args.jobs) as pool:
        if "accuracy" in parts:
            started = _cpu_seconds()
            report.update(accuracy_part(pool, seeds, [int(s) for s in
                                                      args.tune_seeds.split(",")]))
            report["cpu_seconds_accuracy"] = round(_cpu_seconds() - started, 1)
        if "time" in parts:
            lr = args.fedbuff_lr
            if lr is None:
                if "chosen" not in report:
                    parser.error("--parts time without accuracy needs --fedbuff-lr")
                lr = float(report["chosen"]["fedbuff"].get("server_lr", 1.0))
            started = _cpu_seconds()
            report["time_to_target"] = time_part(
                pool, seeds, [s.strip() for s in args.slow.split(",") if s.strip()],
                lr)
            report["fedbuff_server_lr"] = lr
            report["cpu_seconds_time"] = round(_cpu_seconds() - started, 1)

    print_report(report, [float(t) for t in args.targets.split(",")])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


_CPU_SECONDS: list[float] = []


def _timed(function: Any, *args: Any) -> tuple[Any, float]:
    """Run a job in a worker; return its result and the CPU seconds it took."""
    started = time.process_time()
    return function(*args), time.process_time() - started


def _submit(pool: ProcessPoolExecutor, function: Any, *args: Any) -> Any:
    return pool.submit(_timed, function, *args)


def _result(job: Any) -> Any:
    value, seconds = job.result()
    _CPU_SECONDS.append(seconds)
    return value


def _cpu_seconds() -> float:
    return float(sum(_CPU_SECONDS))


def accuracy_part(pool: ProcessPoolExecutor, seeds: list[int],
                  tune_seeds: list[int]) -> dict[str, Any]:
    """Tune on validation rows, then score every method on the test rows."""
    jobs = {(m.label, i, seed): _submit(pool, run_method, m, options, seed, True)
            for m in METHODS for i, options in enumerate(m.grid)
            for seed in tune_seeds if len(m.grid) > 1}
    chosen: dict[str, dict[str, Any]] = {}
    tuning: dict[str, list[dict[str, Any]]] = {}
    for method in METHODS:
        if len(method.grid) == 1:
            chosen[method.label] = method.grid[0]
            continue
        scores = []
        for i in range(len(method.grid)):
            runs = [_result(jobs[(method.label, i, seed)]) for seed in tune_seeds]
            scores.append(float(np.mean([np.mean(list(r.values())) for r in runs])))
        tuning[method.label] = [{"options": o, "validation_accuracy": round(v, 4)}
                                for o, v in zip(method.grid, scores, strict=True)]
        chosen[method.label] = method.grid[int(np.argmax(scores))]

    finals = {(m.label, seed): _submit(pool, run_method, m, chosen[m.label], seed,
                                       False)
              for m in METHODS for seed in seeds}
    baselines = {seed: _submit(pool, run_baselines, seed) for seed in seeds}
    results: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        for name, scores in _result(baselines[seed]).items():
            results.setdefault(name, []).append(scores)
    for method in METHODS:
        results[method.label] = [_result(finals[(method.label, s)]) for s in seeds]
    return {"tune_seeds": tune_seeds, "tuning": tuning, "chosen": chosen,
            "accuracy": {name: summarise(v) for name, v in results.items()}}


def time_part(pool: ProcessPoolExecutor, seeds: list[int], slow_sites: list[str],
              server_lr: float) -> dict[str, list[dict[str, Any]]]:
    """Run sync FedAvg, sync with FedBuff's server lr, and async FedBuff."""
    horizon = ROUNDS * LOCAL["local_steps"] * STEP_SECONDS / 0.1
    jobs = {(kind, slow, seed): _submit(pool, time_run, kind, seed, slow, server_lr,
                                        horizon)
            for kind in ("sync", "sync-lr", "async")
            for slow in slow_sites for seed in seeds}
    curves: dict[str, list[dict[str, Any]]] = {}
    for (kind, slow, seed), job in jobs.items():
        curves.setdefault(f"{kind} / {slow} slow", []).append({"seed": seed,
                                                              **_result(job)})
    return curves


def print_report(report: dict[str, Any], targets: list[float]) -> None:
    """Print the tuning choices, the accuracy table and the time table."""
    print(f"seeds {report['seeds']}")
    if "accuracy" in report:
        _print_accuracy(report)
    if "time_to_target" in report:
        _print_time(report, targets)


def _print_accuracy(report: dict[str, Any]) -> None:
    print(f"tuning seeds {report['tune_seeds']}; CPU seconds "
          f"{report['cpu_seconds_accuracy']}")
    print("\nTuned on validation rows (mean validation accuracy per setting):")
    for label, rows in report["tuning"].items():
        text = ", ".join(f"{_options(r['options'])}: {r['validation_accuracy']:.3f}"
                         for r in rows)
        print(f"  {label}: {text} -> {_options(report['chosen'][label])}")
    print("\nTest accuracy, mean +- std over seeds (FLamby: mean over centres)")
    header = ["method", *SITES, "mean", "FLamby"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, table in report["accuracy"].items():
        cells = [f"{table[s][0]:.3f} +- {table[s][1]:.3f}" for s in (*SITES, "mean")]
        flamby = FLAMBY.get(name)
        reference = f"{flamby:.3f}" if flamby is not None else ""
        print(f"| {name} | " + " | ".join(cells) + f" | {reference} |")


def _print_time(report: dict[str, Any], targets: list[float]) -> None:
    print(f"\nSimulated seconds to a mean test accuracy (one task: 1 s at nominal "
          f"speed, 10 s at the slow centre; FedBuff server lr "
          f"{report['fedbuff_server_lr']}; CPU seconds {report['cpu_seconds_time']})")
    print("| run | " + " | ".join(f"to {t:.2f}" for t in targets)
          + " | accuracy at 150 s | site tasks |")
    print("|" + "---|" * (len(targets) + 3))
    for key, runs in report["time_to_target"].items():
        cells = []
        for target in targets:
            reached = [time_to_target(r["times"], r["means"], target) for r in runs]
            hits = [t for t in reached if t is not None]
            median = f"{np.median(hits):.0f} s" if hits else "never"
            cells.append(f"{median} ({len(hits)}/{len(runs)} seeds)")
        finals = [r["means"][-1] for r in runs]
        tasks = np.mean([r["tasks"] for r in runs])
        cells.append(f"{np.mean(finals):.3f} +- {np.std(finals):.3f}")
        cells.append(f"{tasks:.0f}")
        print(f"| {key} | " + " | ".join(cells) + " |")


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


if __name__ == "__main__":
    main()
