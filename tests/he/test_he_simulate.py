"""CKKS in ``prifed simulate``: the heart job matches the plain run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from prifed.core.strategy import FedAvg
from prifed.errors import ConfigError, NotSupportedError
from prifed.he.params import HomomorphicSettings
from prifed.he.simulate import homomorphic_federation
from prifed.privacy.federation import PrivacyOptions
from prifed.simulation import SimulationConfig, run_simulation


def heart_config(**changes: object) -> SimulationConfig:
    return SimulationConfig(rounds=2, local_steps=20, baselines=False,
                            **changes)  # type: ignore[arg-type]


def test_heart_job_matches_plain_run() -> None:
    plain = run_simulation(heart_config())
    sealed = run_simulation(heart_config(homomorphic=HomomorphicSettings()))
    for name, value in plain.model.items():
        np.testing.assert_allclose(sealed.model[name], value, rtol=0, atol=1e-6)
    plain_final = plain.methods[0].final
    sealed_final = sealed.methods[0].final
    for site, metrics in plain_final.items():
        assert sealed_final[site]["accuracy"] == metrics["accuracy"]


def test_homomorphic_with_dp_is_rejected(tmp_path: Path) -> None:
    config = heart_config(homomorphic=HomomorphicSettings(),
                          privacy=PrivacyOptions("record", epsilon=1.0,
                                                 site_root=str(tmp_path)))
    with pytest.raises(NotSupportedError, match="choose one of them"):
        config.validate()


def test_sampling_needs_evaluation_every_round() -> None:
    sites = [SimpleNamespace(name=name, num_train=10) for name in "abc"]
    with pytest.raises(ConfigError, match="needs evaluation in every round"):
        homomorphic_federation(FedAvg(sites_per_round=2), {}, sites, {}, [],
                               HomomorphicSettings(max_weight=10.0),
                               evaluate_every=3)
