"""Shared builders for the privacy tests: small sites, policies and instructions."""

from pathlib import Path

import numpy as np

from prifed.core.messages import TrainInstruction
from prifed.privacy.client import PrivateSiteClient
from prifed.privacy.policy import SitePolicy, write_policy
from prifed.privacy.settings import DPSettings
from prifed.training.models import build_model, get_params

FEATURES = 6
TRAINING = {"local_steps": 10, "batch_size": 4, "lr": 0.05, "optimizer": "sgd"}


def site_rows(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    return x, y


def make_factory(name="logreg"):
    return lambda: build_model(name, FEATURES, 0)


def make_site(folder: Path, name="Hungary", rows=40, limit=None, delta=1e-3,
              factory=None, **policy) -> PrivateSiteClient:
    """Write a policy into ``folder`` (unless one exists) and build the site."""
    if not (folder / "privacy-policy.json").exists():
        write_policy(folder, SitePolicy(epsilon_limit=limit, delta=delta, **policy))
    x, y = site_rows(rows, seed=len(name))
    return PrivateSiteClient(name, factory or make_factory(), x, y, x[:8], y[:8],
                             seed=1, privacy_dir=folder, noise_seed=5)


def instruction(site, server_round=1, **dp):
    values = {"mode": "record", "delta": 1e-3, "noise_multiplier": 2.0,
              "clip_norm": 1.0, "planned_rounds": 3} | dp
    settings = DPSettings(**values)
    return TrainInstruction(site, server_round,
                            dict(TRAINING, dp=settings.to_config()))


def global_params(factory=None):
    return get_params((factory or make_factory())())
