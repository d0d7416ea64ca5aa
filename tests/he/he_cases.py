"""Helpers shared by the homomorphic aggregation tests."""

from __future__ import annotations

import numpy as np


def plain_weighted_mean(updates: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Weighted mean in float64 with numpy alone, the reference for CKKS."""
    stacked = np.stack([np.asarray(u, np.float64) for u in updates])
    return np.average(stacked, axis=0, weights=np.asarray(weights, np.float64))
