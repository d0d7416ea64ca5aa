"""Fixtures of the deployment tests: the simulation that deployed runs must match."""

from __future__ import annotations

import functools

import numpy as np
import pytest


@functools.lru_cache(maxsize=4)
def _simulated(rounds: int, local_steps: int, lr: float, strategy: str = "fedavg",
               model: str = "logreg") -> dict[str, np.ndarray]:
    from prifed.simulation import SimulationConfig, run_simulation

    config = SimulationConfig(model=model, strategy=strategy, rounds=rounds,
                              local_steps=local_steps, batch_size=4, lr=lr,
                              optimizer="sgd", standardize="federated",
                              test_fraction=0.34, seed=42, baselines=False)
    return run_simulation(config).model


@pytest.fixture(scope="session")
def simulated():
    """Return the final model of ``prifed simulate`` for the given settings."""
    return _simulated
