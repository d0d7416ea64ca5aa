"""Site-level DP (DP-FedAvg): clip each site's update, add Gaussian noise to the sum.

After McMahan et al., "Learning Differentially Private Recurrent Language
Models" (ICLR 2018). A site's update is its model delta (local model minus
the round's global model) over every floating-point tensor; the whole delta
is scaled down to L2 norm at most ``clip_norm``. Sites are weighted equally
(each reply carries weight 1), so adding or removing one site moves the sum
of deltas by at most ``clip_norm``, and Gaussian noise of standard deviation
``noise_multiplier * clip_norm`` on that sum gives site-level DP. The mean
divides by the number of sites that contributed, which is treated as public.

Who adds the noise:

- the coordinator (:class:`NoisyMean`), when it sees individual updates.
  Sites then trust it to add the noise and not to keep the clean sum or the
  clipped updates: a weaker trust assumption.
- every site, a share (:func:`add_noise_share`), before its update is masked
  by secure aggregation. Shares of standard deviation
  ``noise_multiplier * clip_norm / sqrt(min_sites)`` from at least
  ``min_sites`` sites sum to at least the calibrated noise, and no party sees
  the sum without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from prifed.core.aggregate import cast_like
from prifed.core.messages import TrainReply
from prifed.core.params import ParameterSet, copy_params, is_float
from prifed.core.strategy import MeanAggregator
from prifed.errors import ConfigError


def update_norm(update: Mapping[str, np.ndarray],
                reference: Mapping[str, np.ndarray]) -> float:
    """Return the L2 norm of ``update - reference`` over all float tensors."""
    total = 0.0
    for name, value in reference.items():
        if is_float(value):
            delta = update[name].astype(np.float64) - value.astype(np.float64)
            total += float(np.sum(delta * delta))
    return math.sqrt(total)


def clip_update(update: Mapping[str, np.ndarray],
                reference: Mapping[str, np.ndarray],
                clip_norm: float) -> tuple[ParameterSet, float]:
    """Scale the delta of ``update`` to L2 norm at most ``clip_norm``.

    Returns the clipped model (reference plus clipped delta, in the reference
    dtypes) and the norm before clipping. Non-float tensors take the
    reference's values, so nothing outside the clipped delta leaves the site.
    """
    if not clip_norm > 0:
        raise ConfigError(f"clip norm must be positive; got {clip_norm}")
    norm = update_norm(update, reference)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped: ParameterSet = {}
    for name, value in reference.items():
        if is_float(value):
            base = value.astype(np.float64)
            delta = update[name].astype(np.float64) - base
            clipped[name] = cast_like(base + scale * delta, value.dtype)
        else:
            clipped[name] = np.array(value, copy=True)
    return clipped, norm


def add_gaussian_noise(params: Mapping[str, np.ndarray], std: float,
                       rng: np.random.Generator) -> ParameterSet:
    """Return ``params`` with N(0, std^2) added to every float value."""
    if not std >= 0:
        raise ConfigError(f"noise standard deviation must be at least 0; got {std}")
    noisy = copy_params(params)
    if std == 0:
        return noisy
    for name, value in params.items():
        if is_float(value):
            noise = rng.normal(0.0, std, size=value.shape)
            noisy[name] = cast_like(value.astype(np.float64) + noise, value.dtype)
    return noisy


def noise_share_std(noise_multiplier: float, clip_norm: float,
                    min_sites: int) -> float:
    """Return the standard deviation of one site's share of the noise."""
    if min_sites < 1:
        raise ConfigError(f"min_sites must be at least 1; got {min_sites}")
    return noise_multiplier * clip_norm / math.sqrt(min_sites)


def add_noise_share(clipped: Mapping[str, np.ndarray], noise_multiplier: float,
                    clip_norm: float, min_sites: int,
                    rng: np.random.Generator) -> ParameterSet:
    """Add this site's share of the DP-FedAvg noise to its clipped model.

    Call it on the site, after :func:`clip_update` and before the update is
    masked for secure aggregation. When at least ``min_sites`` sites add a
    share, the noise in the sum has standard deviation at least
    ``noise_multiplier * clip_norm``.
    """
    return add_gaussian_noise(clipped, noise_share_std(noise_multiplier, clip_norm,
                                                       min_sites), rng)


def secagg_value_bound(noise_multiplier: float, clip_norm: float, min_sites: int,
                       num_stds: float = 6.0) -> float:
    """Return a per-value clip for secure aggregation that noisy deltas stay under.

    Secure aggregation's fixed-point encoding clips each value of the delta;
    a clipped noise share would change the noise the accountant assumes. A
    bound of ``clip_norm`` plus ``num_stds`` share deviations is exceeded with
    probability about 2e-9 per value at the default of 6.
    """
    return clip_norm + num_stds * noise_share_std(noise_multiplier, clip_norm,
                                                  min_sites)


class NoisyMean:
    """A mean aggregator that re-clips each update and noises the result.

    The coordinator uses it when it sees individual updates: every reply is
    clipped again against this round's global model (honest sites clipped
    already, so this only enforces the bound), weighted 1, and the mean gets
    Gaussian noise of standard deviation ``noise_multiplier * clip_norm /
    count``, which is the calibrated noise on the sum divided by the count.
    """

    def __init__(self, inner: MeanAggregator, reference: Mapping[str, np.ndarray],
                 noise_multiplier: float, clip_norm: float,
                 rng: np.random.Generator) -> None:
        self.inner = inner
        self.reference = reference
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.rng = rng

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def total_weight(self) -> float:
        return self.inner.total_weight

    def add(self, reply: TrainReply) -> None:
        """Clip one reply's update, give it weight 1 and add it to the mean."""
        clipped, _ = clip_update(reply.params, self.reference, self.clip_norm)
        self.inner.add(TrainReply(reply.site, reply.server_round, clipped, 1,
                                  reply.metrics, reply.extra))

    def result(self) -> ParameterSet:
        """Return the mean of clipped updates plus the calibrated noise."""
        std = self.noise_multiplier * self.clip_norm / max(self.count, 1)
        return add_gaussian_noise(self.inner.result(), std, self.rng)
