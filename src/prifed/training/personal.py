"""Personalisation: layers a site keeps to itself, and local fine-tuning.

A site that keeps a layer local (FedBN keeps normalisation layers, FedPer
the head) loads its own copy of that layer over the global one before
training and evaluation, and sends the global copy back unchanged, so the
local values never reach the coordinator. Fine-tuning trains a copy of the
personalised model for a few steps on the site's training rows before it is
evaluated; it never changes what the site sends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from prifed.errors import ConfigError


@dataclass(frozen=True)
class Personalization:
    """The layers a site keeps local and its fine-tuning before evaluation.

    ``local_layers`` are tensor names or module prefixes (``layers.1`` matches
    ``layers.1.weight`` and ``layers.1.running_mean``). ``finetune_lr`` and
    ``finetune_batch_size`` default to the training settings of the round.
    """

    local_layers: tuple[str, ...] = ()
    finetune_steps: int = 0
    finetune_lr: float | None = None
    finetune_optimizer: str = "sgd"
    finetune_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.finetune_steps < 0:
            raise ConfigError("finetune_steps must be at least 0; got "
                              f"{self.finetune_steps}")
        if self.finetune_lr is not None and not self.finetune_lr > 0:
            raise ConfigError(f"finetune_lr must be positive; got {self.finetune_lr}")
        if self.finetune_batch_size is not None and self.finetune_batch_size < 1:
            raise ConfigError("finetune_batch_size must be at least 1; got "
                              f"{self.finetune_batch_size}")

    @property
    def enabled(self) -> bool:
        """Tell whether the site reports a personalised model at all."""
        return bool(self.local_layers) or self.finetune_steps > 0

    def is_local(self, name: str) -> bool:
        """Tell whether tensor ``name`` stays at the site."""
        return any(name == prefix or name.startswith(prefix + ".")
                   for prefix in self.local_layers)

    def local_names(self, names: Iterable[str]) -> list[str]:
        """List the tensors that stay local; raise if a prefix matches none."""
        names = list(names)
        for prefix in self.local_layers:
            if not any(n == prefix or n.startswith(prefix + ".") for n in names):
                raise ConfigError(f"local layer {prefix!r} matches no tensor of the "
                                  f"model; tensors are {', '.join(names)}")
        return [n for n in names if self.is_local(n)]


def merge_local(global_params: Mapping[str, np.ndarray],
                local_params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the global model with the site's local tensors put over it."""
    merged = dict(global_params)
    merged.update(local_params)
    return merged
