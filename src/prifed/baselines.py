"""Honest baselines: each site training alone, and pooled training.

Pooled training concatenates every site's training rows in one place. It is
the upper reference a federation tries to reach, not something a consortium
could run on patient data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from prifed.sitedata import PreparedSite
from prifed.training.local import LocalTrainer, evaluate_model, make_optimizer
from prifed.training.models import build_model

Curve = list[dict[str, dict[str, float]]]
"""Per round, site name to that site's test metrics."""

RoundCallback = Callable[[int, dict[str, dict[str, float]]], None]


def train_local(sites: Sequence[PreparedSite], model_name: str, rounds: int,
                config: dict[str, Any], seed: int,
                on_round: RoundCallback | None = None) -> Curve:
    """Train one model per site on its own rows; evaluate each on its own test set."""
    num_features = sites[0].train_x.shape[1]
    models = {s.name: build_model(model_name, num_features, seed) for s in sites}
    trainers = {s.name: LocalTrainer(s.train_x, s.train_y, seed + 1000 + i)
                for i, s in enumerate(sites)}
    optimizers = {name: make_optimizer(model, config) for name, model in models.items()}
    curve: Curve = []
    for server_round in range(1, rounds + 1):
        metrics = {}
        for site in sites:
            trainers[site.name].train(models[site.name], config,
                                      optimizer=optimizers[site.name])
            metrics[site.name] = evaluate_model(models[site.name], site.test_x,
                                                site.test_y)
        curve.append(metrics)
        if on_round is not None:
            on_round(server_round, metrics)
    return curve


def train_pooled(sites: Sequence[PreparedSite], model_name: str, rounds: int,
                 config: dict[str, Any], seed: int,
                 on_round: RoundCallback | None = None) -> Curve:
    """Train one model on all sites' training rows pooled (the upper reference).

    Each round runs as many steps as all sites together run in a federated
    round, so both see the same number of mini-batches.
    """
    train_x = np.concatenate([s.train_x for s in sites])
    train_y = np.concatenate([s.train_y for s in sites])
    model = build_model(model_name, train_x.shape[1], seed)
    trainer = LocalTrainer(train_x, train_y, seed + 2000)
    optimizer = make_optimizer(model, config)
    pooled_config = dict(config)
    pooled_config["local_steps"] = int(config.get("local_steps", 100)) * len(sites)
    curve: Curve = []
    for server_round in range(1, rounds + 1):
        trainer.train(model, pooled_config, optimizer=optimizer)
        metrics = {s.name: evaluate_model(model, s.test_x, s.test_y) for s in sites}
        curve.append(metrics)
        if on_round is not None:
            on_round(server_round, metrics)
    return curve
