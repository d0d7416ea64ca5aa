"""FedProx (Li et al., MLSys 2020): FedAvg with a proximal term at the sites.

The coordinator aggregates as FedAvg does. Each instruction carries
``proximal_mu``, and the site adds ``mu / 2 * ||w - w_global||^2`` over its
trainable tensors to the local loss, which keeps a site's model near the
global one when its data differ from the others'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from prifed.core.messages import TrainInstruction
from prifed.core.strategy import FedAvg
from prifed.errors import ConfigError
from prifed.strategies.base import PROXIMAL_MU_KEY


class FedProx(FedAvg):
    """FedAvg whose sites minimise the loss plus ``mu / 2 * ||w - w_global||^2``."""

    name = "fedprox"

    def __init__(self, sites_per_round: int | None = None,
                 local_config: Mapping[str, Any] | None = None,
                 mu: float = 0.01) -> None:
        super().__init__(sites_per_round, local_config)
        if not float(mu) >= 0:
            raise ConfigError(f"mu must be at least 0; got {mu!r}")
        self.mu = float(mu)

    def configure_train(self, server_round: int, params: Mapping[str, np.ndarray],
                        sites: Sequence[str], rng: np.random.Generator
                        ) -> list[TrainInstruction]:
        """Return FedAvg's instructions with ``proximal_mu`` in each config."""
        instructions = super().configure_train(server_round, params, sites, rng)
        return [TrainInstruction(i.site, i.server_round,
                                 {**i.config, PROXIMAL_MU_KEY: self.mu}, i.extra)
                for i in instructions]
