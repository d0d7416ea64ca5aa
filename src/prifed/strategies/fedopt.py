"""Adaptive server optimisers: FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021).

Each round the coordinator forms the pseudo-gradient ``delta = mean - x``
from the sample-weighted mean of the replies, then steps the global model:

    m = beta1 * m + (1 - beta1) * delta
    v = v + delta**2                                   (FedAdagrad)
    v = v - (1 - beta2) * delta**2 * sign(v - delta**2)  (FedYogi)
    v = beta2 * v + (1 - beta2) * delta**2             (FedAdam)
    x = x + server_lr * m / (sqrt(v) + tau)

as in Algorithm 2 of Reddi et al., "Adaptive Federated Optimization", ICLR
2021: no bias correction, ``m`` starts at 0 and ``v`` at ``tau**2``. Only
trainable float tensors are stepped; buffers take the weighted mean. The
strategies need only the mean of the replies, so a secure aggregator can
compute it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from prifed.core.params import ParameterSet
from prifed.core.strategy import MeanAggregator, Strategy
from prifed.errors import ConfigError
from prifed.log import get_logger
from prifed.strategies.base import (apply_server_step, require_fraction,
                                    require_positive, stepped_names)

logger = get_logger(__name__)


class FedOpt(Strategy):
    """Base of the server optimisers: moments over the mean pseudo-gradient."""

    name: ClassVar[str] = "fedopt"

    def __init__(self, sites_per_round: int | None = None,
                 local_config: Mapping[str, Any] | None = None,
                 server_lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__(sites_per_round, local_config)
        self.server_lr = require_positive("server_lr", server_lr)
        self.beta1 = require_fraction("beta1", beta1)
        self.beta2 = require_fraction("beta2", beta2)
        self.tau = require_positive("tau", tau)
        self.first_moment: dict[str, np.ndarray] = {}
        self.second_moment: dict[str, np.ndarray] = {}
        self.steps_taken = 0
        self._initialized = False

    def initialize(self, params: Mapping[str, np.ndarray],
                   trainable: Iterable[str]) -> None:
        """Learn the trainable tensors and start the moments (m at 0, v at tau^2)."""
        super().initialize(params, trainable)
        names = stepped_names(params, self.trainable)
        self.first_moment = {n: np.zeros(params[n].shape) for n in names}
        self.second_moment = {n: np.full(params[n].shape, self.tau ** 2)
                              for n in names}
        self.steps_taken = 0
        self._initialized = True

    def update_second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Return the new second moment; each optimiser has its own rule."""
        raise NotImplementedError

    def finish_aggregation(self, server_round: int,
                           params: Mapping[str, np.ndarray],
                           aggregator: MeanAggregator) -> ParameterSet:
        """Step the trainable tensors along the mean pseudo-gradient."""
        if not self._initialized:
            raise ConfigError(f"{self.name} needs initialize() (or a restored "
                              "state) before its first aggregation, to know "
                              "which tensors are trainable")
        mean = aggregator.result()
        steps = {}
        for name, m in self.first_moment.items():
            if params[name].shape != m.shape:
                raise ConfigError(f"{self.name}: tensor {name!r} has shape "
                                  f"{params[name].shape}; its moments have {m.shape}")
            delta = mean[name].astype(np.float64) - params[name].astype(np.float64)
            m[:] = self.beta1 * m + (1 - self.beta1) * delta
            v = self.update_second_moment(self.second_moment[name], delta)
            self.second_moment[name] = v
            steps[name] = self.server_lr * m / (np.sqrt(v) + self.tau)
        self.steps_taken += 1
        logger.debug("aggregate round %d: %s stepped %d tensors", server_round,
                     self.name, len(steps))
        return apply_server_step(params, mean, steps)

    def state_dict(self) -> dict[str, Any]:
        """Return the moments, the trainable names and the step count."""
        return {"trainable": sorted(self.trainable), "steps_taken": self.steps_taken,
                "first_moment": {n: m.copy() for n, m in self.first_moment.items()},
                "second_moment": {n: v.copy()
                                  for n, v in self.second_moment.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the moments saved by :meth:`state_dict`."""
        self.trainable = frozenset(state["trainable"])
        self.steps_taken = int(state["steps_taken"])
        self.first_moment = {n: np.array(m, np.float64)
                             for n, m in state["first_moment"].items()}
        self.second_moment = {n: np.array(v, np.float64)
                              for n, v in state["second_moment"].items()}
        self._initialized = True


class FedAdagrad(FedOpt):
    """FedAdagrad: the second moment sums every squared pseudo-gradient."""

    name = "fedadagrad"

    def update_second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v + delta ** 2


class FedYogi(FedOpt):
    """FedYogi: an additive second-moment update that grows v only slowly."""

    name = "fedyogi"

    def update_second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        squared = delta ** 2
        return v - (1 - self.beta2) * squared * np.sign(v - squared)


class FedAdam(FedOpt):
    """FedAdam: an exponential moving average of the squared pseudo-gradient."""

    name = "fedadam"

    def update_second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * delta ** 2
