"""DP-SGD on one site's rows through Opacus: Poisson batches, clipping, noise.

Each step draws a Poisson sample (every row independently with probability
``q = expected batch size / rows``), computes per-sample gradients with
Opacus's :class:`~opacus.GradSampleModule`, clips each to ``clip_norm`` and
adds Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` to
their sum through :class:`~opacus.optim.DPOptimizer`, which divides by the
expected batch size. An empty sample is a valid step: the update is noise
alone, as the analysis of the sampled Gaussian mechanism assumes.

Noise comes from a ``torch.Generator`` (Mersenne Twister), not a
cryptographically secure source: Opacus's ``secure_mode`` needs torchcsprng.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from prifed.privacy.accountant import GaussianEvent, sampling_rate
from prifed.privacy.validation import validate_for_dp
from prifed.training.local import make_optimizer


@dataclass(frozen=True)
class DPSGDRound:
    """Outcome of one round of DP-SGD: its mechanism and the number of empty steps."""

    event: GaussianEvent
    empty_steps: int
    seconds: float


class DPSGDTrainer:
    """Train models on one site's rows with DP-SGD, one round at a time.

    ``generator`` drives both the Poisson sampling and the noise. Seed it from
    the operating system's entropy in deployment; a fixed seed makes a
    simulation reproducible, and anyone who has the seed can remove the noise.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray,
                 generator: torch.Generator) -> None:
        self.features = torch.from_numpy(np.ascontiguousarray(features, np.float32))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, np.float32))
        self.generator = generator

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    def train(self, model: nn.Module, *, steps: int, expected_batch_size: float,
              noise_multiplier: float, clip_norm: float, lr: float,
              optimizer: str = "sgd") -> DPSGDRound:
        """Run ``steps`` DP-SGD steps on ``model`` in place; return the mechanism."""
        started = time.perf_counter()
        model.train()
        validate_for_dp(model)
        rate = sampling_rate(expected_batch_size, self.num_rows)

        # Per-sample gradients of a summed loss are the true per-row gradients,
        # and an empty batch sums to zero instead of a NaN mean. DPOptimizer
        # divides the clipped, noised sum by the expected batch size.
        private = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        dp_optimizer = DPOptimizer(
            make_optimizer(model, {"optimizer": optimizer, "lr": lr}),
            noise_multiplier=noise_multiplier, max_grad_norm=clip_norm,
            expected_batch_size=expected_batch_size, loss_reduction="mean",
            generator=self.generator)
        sampler = UniformWithReplacementSampler(
            num_samples=self.num_rows, sample_rate=rate, generator=self.generator,
            steps=steps)
        loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
        empty = 0
        try:
            with warnings.catch_warnings():
                # Opacus's backward hooks fire on module outputs when the
                # input needs no gradient; torch warns, and the gradients are
                # right.
                warnings.filterwarnings("ignore", message="Full backward hook",
                                        category=UserWarning)
                for indices in sampler:
                    empty += not indices
                    self._step(private, dp_optimizer, loss_fn, indices)
        finally:
            private.to_standard_module()
        return DPSGDRound(GaussianEvent(noise_multiplier, rate, steps), empty,
                          time.perf_counter() - started)

    def _step(self, model: nn.Module, optimizer: DPOptimizer, loss_fn: nn.Module,
              indices: list[int]) -> None:
        index = torch.tensor(indices, dtype=torch.long)
        optimizer.zero_grad()
        loss = loss_fn(model(self.features[index]), self.labels[index])
        loss.backward()
        optimizer.step()
