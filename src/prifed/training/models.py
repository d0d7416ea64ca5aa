"""Models for tabular data and their conversion to and from parameter sets."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from prifed.core.params import ParameterSet
from prifed.errors import ConfigError

MODEL_NAMES = ("logreg", "mlp")


class LogisticRegression(nn.Module):
    """A single linear layer; the sigmoid lives in the loss."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class MLP(nn.Module):
    """A two-layer perceptron with a ReLU hidden layer."""

    def __init__(self, num_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


class BatchNormMLP(nn.Module):
    """An MLP with batch normalisation, for testing buffers through aggregation."""

    def __init__(self, num_features: int, hidden: int = 16) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(num_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def build_model(name: str, num_features: int, seed: int) -> nn.Module:
    """Build a model by name with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    if name == "logreg":
        return LogisticRegression(num_features)
    if name == "mlp":
        return MLP(num_features)
    if name == "bn-mlp":
        return BatchNormMLP(num_features)
    raise ConfigError(f"model must be one of {', '.join(MODEL_NAMES)}; got {name!r}")


def get_params(model: nn.Module) -> ParameterSet:
    """Copy a model's parameters and buffers into a parameter set."""
    return {name: tensor.detach().cpu().numpy().copy()
            for name, tensor in model.state_dict().items()}


def set_params(model: nn.Module, params: Mapping[str, np.ndarray]) -> None:
    """Load a parameter set into a model, keeping each tensor's dtype."""
    state = {name: torch.from_numpy(np.array(value, copy=True))
             for name, value in params.items()}
    model.load_state_dict(state, strict=True)


def trainable_names(model: nn.Module) -> list[str]:
    """List the tensors an optimiser steps; buffers are left out."""
    return [name for name, param in model.named_parameters() if param.requires_grad]
