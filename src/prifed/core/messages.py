"""Messages of the round protocol, independent of how they travel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prifed.core.params import ParameterSet


@dataclass(frozen=True)
class TrainInstruction:
    """Work for one site in one round: its settings and extra tensors."""

    site: str
    server_round: int
    config: dict[str, Any] = field(default_factory=dict)
    extra: ParameterSet = field(default_factory=dict)


@dataclass
class TrainReply:
    """A site's answer to a training instruction: its local model and counts.

    ``params`` is the site's model after local training, with the same names,
    shapes and dtypes as the global model. ``num_samples`` is the number of
    training examples the site actually used this round and sets its weight.
    """

    site: str
    server_round: int
    params: ParameterSet
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    extra: ParameterSet = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A site that did not deliver a usable reply, and why."""

    site: str
    server_round: int
    reason: str


@dataclass
class EvaluateReply:
    """Metrics of the global model on one site's held-out test set."""

    site: str
    num_samples: int
    metrics: dict[str, float]
