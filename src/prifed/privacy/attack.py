"""A loss-threshold membership inference attack on a trained model.

After Yeom et al., "Privacy Risk in Machine Learning: Analyzing the
Connection to Overfitting" (CSF 2018): a record the model trained on tends
to have a lower loss than one it never saw, so the attacker guesses
"member" when the loss is below a threshold. Sweeping the threshold gives a
ROC curve over the site's training records (members) and its held-out test
records (non-members); its AUC is 0.5 when the model leaks nothing through
its losses and 1 when membership can be read off exactly. The test split is
drawn from the same rows as the training split, so the two are exchangeable
apart from training.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from prifed.core.params import params_from_bytes
from prifed.data.partition import PartitionSpec
from prifed.data.tabular import TableSpec
from prifed.errors import ConfigError
from prifed.sitedata import PreparedSite, prepare_sites
from prifed.training.models import build_model, set_params


@dataclass(frozen=True)
class AttackResult:
    """The attack's AUC on one site (or all sites pooled) and the counts behind it."""

    site: str
    auc: float
    members: int
    non_members: int
    member_loss: float
    non_member_loss: float

    @property
    def chance_std(self) -> float:
        """Return the AUC's standard deviation when losses carry no membership.

        Under that null hypothesis the AUC is the Mann-Whitney U over m n, with
        variance (m + n + 1) / (12 m n) for m members and n others (no ties).
        """
        m, n = self.members, self.non_members
        if m == 0 or n == 0:
            return math.nan
        return math.sqrt((m + n + 1) / (12 * m * n))


def record_losses(model: nn.Module, features: np.ndarray,
                  labels: np.ndarray) -> np.ndarray:
    """Return the binary cross-entropy of each record under the model."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(features, np.float32)))
        losses = nn.functional.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(np.ascontiguousarray(labels, np.float32)),
            reduction="none")
    return losses.numpy().astype(np.float64)


def membership_auc(member_losses: np.ndarray, non_member_losses: np.ndarray
                   ) -> float:
    """Return the ROC AUC of guessing "member" for lower losses."""
    if member_losses.size == 0 or non_member_losses.size == 0:
        return math.nan
    truth = np.concatenate([np.ones(member_losses.size),
                            np.zeros(non_member_losses.size)])
    scores = -np.concatenate([member_losses, non_member_losses])
    return float(roc_auc_score(truth, scores))


def attack_sites(model: nn.Module, sites: list[PreparedSite]) -> list[AttackResult]:
    """Attack the model on each site's records, then on all sites pooled."""
    results = []
    pooled_members, pooled_others = [], []
    for site in sites:
        members = record_losses(model, site.train_x, site.train_y)
        others = record_losses(model, site.test_x, site.test_y)
        pooled_members.append(members)
        pooled_others.append(others)
        results.append(_result(site.name, members, others))
    results.append(_result("all sites", np.concatenate(pooled_members),
                           np.concatenate(pooled_others)))
    return results


def _result(site: str, members: np.ndarray, others: np.ndarray) -> AttackResult:
    return AttackResult(site, membership_auc(members, others), int(members.size),
                        int(others.size), float(np.mean(members)),
                        float(np.mean(others)))


def mean_site_auc(results: list[AttackResult]) -> float:
    """Return the plain mean of the per-site AUCs (the pooled row left out)."""
    values = [r.auc for r in results if r.site != "all sites" and not math.isnan(r.auc)]
    return float(np.mean(values)) if values else math.nan


def attack_run_folder(folder: Path) -> tuple[list[AttackResult], dict[str, Any]]:
    """Rebuild a run's site splits from its summary and attack its final model."""
    summary_path = folder / "summary.json"
    model_path = folder / "model.safetensors"
    for path in (summary_path, model_path):
        if not path.is_file():
            raise ConfigError(f"run folder {folder} has no {path.name}; run "
                              "prifed simulate with --out first")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    config = summary["config"]
    data = None if config["data"] == "heart (shipped)" else Path(config["data"])
    spec = TableSpec(**config["spec"]) if config.get("spec") else None
    partition = PartitionSpec(**config["partition"]) if config.get("partition") \
        else None
    split_seed = config.get("split_seed")
    sites = prepare_sites(data, spec, config["seed"] if split_seed is None
                          else split_seed, config["test_fraction"],
                          config["standardize"], config.get("sites"), partition)
    params = params_from_bytes(model_path.read_bytes())
    model = build_model(config["model"], sites[0].train_x.shape[1], config["seed"])
    set_params(model, params)
    results = attack_sites(model, sites)
    report = {"attack": "loss threshold (Yeom et al. 2018)",
              "privacy": summary.get("privacy", {"mode": "off"}),
              "mean_site_auc": _clean(mean_site_auc(results)),
              "results": [{k: _clean(v) if isinstance(v, float) else v
                           for k, v in asdict(r).items()}
                          | {"chance_std": _clean(r.chance_std)} for r in results]}
    return results, report


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)
