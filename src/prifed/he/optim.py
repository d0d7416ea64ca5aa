"""Server optimisers that every site runs on the decrypted mean update.

The coordinator cannot step a ciphertext, so each site applies the same step
to its own copy of the global model, from optimiser state it keeps itself.
Decryption is deterministic, so every site computes the same model.

The adaptive optimisers follow Algorithm 2 of Reddi et al., "Adaptive
Federated Optimization" (ICLR 2021), with the mean update (pseudo-gradient)
``d = mean(local - global)``:

    m = beta1 * m + (1 - beta1) * d
    FedAdagrad: v = v + d**2
    FedAdam:    v = beta2 * v + (1 - beta2) * d**2
    FedYogi:    v = v - (1 - beta2) * d**2 * sign(v - d**2)
    x = x + server_lr * m / (sqrt(v) + tau)

with ``m`` starting at 0 and ``v`` at ``tau**2``, and no bias correction, as in
the paper. Option names and defaults match the coordinator-side strategies
in :mod:`prifed.strategies.fedopt`, and a test checks that both take the same
step. Only trainable float tensors take the step; buffers (such as batch-norm
statistics) take the plain mean update. Arithmetic is float64 and each tensor
is cast back to its dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import numpy as np

from prifed.core.aggregate import cast_like
from prifed.core.params import ParameterSet, is_float
from prifed.errors import ConfigError


class ServerOptimizer(ABC):
    """Turn the mean update of a round into the next global model."""

    name: ClassVar[str]

    def step(self, params: Mapping[str, np.ndarray],
             mean_update: Mapping[str, np.ndarray],
             trainable: Collection[str]) -> ParameterSet:
        """Return the next global model from the current one and the mean update."""
        out: ParameterSet = {}
        for name, value in params.items():
            current = np.asarray(value, dtype=np.float64)
            update = np.asarray(mean_update[name], dtype=np.float64)
            if name in trainable and is_float(value):
                stepped = current + self._direction(name, update)
            else:
                stepped = current + update
            out[name] = cast_like(stepped, value.dtype)
        self._advance()
        return out

    @abstractmethod
    def _direction(self, name: str, update: np.ndarray) -> np.ndarray:
        """Return the change of one trainable tensor for this round."""

    def _advance(self) -> None:  # noqa: B027 - optional hook
        """Count a step; optimisers with state override this."""

    def state_dict(self) -> ParameterSet:
        """Return the optimiser state as arrays, to keep between rounds."""
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]  # noqa: B027
                        ) -> None:
        """Restore the state returned by :meth:`state_dict`."""


class FedAvgStep(ServerOptimizer):
    """FedAvg: add the mean update, scaled by a server learning rate (1 by default)."""

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        _check_positive("server_lr", server_lr)
        self.server_lr = server_lr

    def _direction(self, name: str, update: np.ndarray) -> np.ndarray:
        return self.server_lr * update


class AdaptiveOptimizer(ServerOptimizer):
    """Common state of FedAdagrad, FedAdam and FedYogi: the moments m and v."""

    def __init__(self, server_lr: float = 0.1, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3) -> None:
        _check_positive("server_lr", server_lr)
        _check_positive("tau", tau)
        for field, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise ConfigError(f"{field} must be in [0, 1); got {value}")
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.steps = 0

    def _direction(self, name: str, update: np.ndarray) -> np.ndarray:
        m = self.m.get(name, np.zeros_like(update))
        v = self.v.get(name, np.full_like(update, self.tau ** 2))
        m = self.beta1 * m + (1.0 - self.beta1) * update
        v = self._second_moment(v, update * update)
        self.m[name] = m
        self.v[name] = v
        return self.server_lr * m / (np.sqrt(v) + self.tau)

    @abstractmethod
    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """Return the new second moment from the old one and the squared update."""

    def _advance(self) -> None:
        self.steps += 1

    def state_dict(self) -> ParameterSet:
        state: ParameterSet = {"steps": np.array(self.steps, dtype=np.int64)}
        state.update({f"m.{name}": value.copy() for name, value in self.m.items()})
        state.update({f"v.{name}": value.copy() for name, value in self.v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.steps = int(state.get("steps", np.array(0)))
        self.m = {key[2:]: np.array(value, dtype=np.float64)
                  for key, value in state.items() if key.startswith("m.")}
        self.v = {key[2:]: np.array(value, dtype=np.float64)
                  for key, value in state.items() if key.startswith("v.")}


class FedAdagrad(AdaptiveOptimizer):
    """FedAdagrad: the second moment sums the squared updates."""

    name = "fedadagrad"

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return v + squared


class FedAdam(AdaptiveOptimizer):
    """FedAdam: the second moment is an exponential average of squared updates."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * squared


class FedYogi(AdaptiveOptimizer):
    """FedYogi: the second moment moves towards the squared update additively."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * squared * np.sign(v - squared)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (FedAvgStep, FedAdagrad, FedAdam, FedYogi)}


def build_server_optimizer(name: str, **options: Any) -> ServerOptimizer:
    """Build a server optimiser by name (fedavg, fedadagrad, fedadam, fedyogi)."""
    try:
        cls = SERVER_OPTIMIZERS[name.lower()]
    except KeyError:
        raise ConfigError(f"server optimiser must be one of "
                          f"{', '.join(SERVER_OPTIMIZERS)}; got {name!r}") from None
    try:
        return cls(**options)
    except TypeError as error:
        raise ConfigError(f"invalid option for server optimiser {name!r}: "
                          f"{error}") from None


def _check_positive(field: str, value: float) -> None:
    if not (value > 0 and np.isfinite(value)):
        raise ConfigError(f"{field} must be positive and finite; got {value}")
