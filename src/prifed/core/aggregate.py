"""Weighted aggregation of parameter sets, streaming one reply at a time."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from prifed.core.params import ParameterSet, is_float


class WeightedMean:
    """Accumulate a sample-weighted mean without holding every update.

    Sums run in float64. The result casts back to each tensor's own dtype:
    float32 stays float32 and integer tensors (batch-norm counters) are
    rounded to the nearest integer.
    """

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self._dtypes = {name: value.dtype for name, value in reference.items()}
        self._sums = {name: np.zeros(value.shape, dtype=np.float64)
                      for name, value in reference.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, params: Mapping[str, np.ndarray], weight: float) -> None:
        """Add one site's parameters with its weight (its sample count)."""
        if weight <= 0:
            raise ValueError(f"weight must be positive; got {weight}")
        for name, total in self._sums.items():
            total += np.asarray(params[name], dtype=np.float64) * weight
        self.total_weight += weight
        self.count += 1

    def add_sum(self, weighted_sum: Mapping[str, np.ndarray], total_weight: float,
                count: int) -> None:
        """Add a sum that was already weighted elsewhere (secure aggregation)."""
        for name, total in self._sums.items():
            total += np.asarray(weighted_sum[name], dtype=np.float64)
        self.total_weight += total_weight
        self.count += count

    def result(self) -> ParameterSet:
        """Return the weighted mean in the reference dtypes."""
        if self.total_weight <= 0:
            raise ValueError("cannot average: total weight is zero")
        return {name: cast_like(total / self.total_weight, self._dtypes[name])
                for name, total in self._sums.items()}


def cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast float64 values to ``dtype``, rounding when it is an integer type."""
    if np.issubdtype(dtype, np.floating):
        return values.astype(dtype)
    if dtype == np.bool_:
        return values >= 0.5
    return np.rint(values).astype(dtype)


def weighted_mean(pairs: list[tuple[Mapping[str, np.ndarray], float]]
                  ) -> ParameterSet:
    """Average parameter sets by weight; a convenience over :class:`WeightedMean`."""
    if not pairs:
        raise ValueError("cannot average an empty list of parameter sets")
    mean = WeightedMean(pairs[0][0])
    for params, weight in pairs:
        mean.add(params, weight)
    return mean.result()


def float_names(params: Mapping[str, np.ndarray]) -> list[str]:
    """List the float tensors, the ones optimisers may step."""
    return [name for name, value in params.items() if is_float(value)]
