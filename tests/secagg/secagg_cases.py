"""Shared inputs of the secure-aggregation tests: seeded models and updates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prifed.core.params import ParameterSet


def site_names(count: int) -> list[str]:
    """Return ``count`` site names that sort in creation order."""
    return [f"site-{i:03d}" for i in range(count)]


def make_round(count: int, values: int = 60, seed: int = 0, spread: float = 0.3
               ) -> tuple[ParameterSet, dict[str, ParameterSet], dict[str, int]]:
    """Return a global model, one local model per site and sample counts.

    The model has a float32 matrix, a float32 bias and an int64 counter, so
    every dtype path of the encoding runs. Deltas stay within ``spread``.
    """
    rng = np.random.default_rng(seed)
    rows = max(1, values // 5)
    reference = {"weight": rng.normal(size=(rows, 5)).astype(np.float32),
                 "bias": rng.normal(size=3).astype(np.float32),
                 "steps": np.array([40], dtype=np.int64)}
    updates = {}
    for site in site_names(count):
        updates[site] = {
            "weight": (reference["weight"] + rng.uniform(-spread, spread, (rows, 5))
                       ).astype(np.float32),
            "bias": (reference["bias"] + rng.uniform(-spread, spread, 3)
                     ).astype(np.float32),
            "steps": reference["steps"].copy(),
        }
    samples = {site: int(rng.integers(1, 400)) for site in site_names(count)}
    return reference, updates, samples


def plain_mean(updates: dict[str, ParameterSet], samples: dict[str, int],
               sites: Sequence[str]) -> dict[str, np.ndarray]:
    """Compute the weighted mean in float64 directly, as the reference result."""
    total = float(sum(samples[site] for site in sites))
    names = next(iter(updates.values())).keys()
    return {name: sum(samples[site] * updates[site][name].astype(np.float64)
                      for site in sites) / total for name in names}
