"""The strategy interface and FedAvg, the first strategy.

A strategy configures each round (which sites, what instructions) and turns the
replies into the next global model. The weighted mean of replies is computed by
a :class:`MeanAggregator`, so a secure or encrypted aggregator can replace the
plain one for strategies that need only the sum of updates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

from prifed.core.aggregate import WeightedMean
from prifed.core.messages import TrainInstruction, TrainReply
from prifed.core.params import ParameterSet, copy_params, validate_update
from prifed.core.secure_sum import PrivateSum, SumMean
from prifed.errors import ConfigError, NotSupportedError


class MeanAggregator(Protocol):
    """Computes the sample-weighted mean of the replies of one round."""

    @property
    def count(self) -> int:
        """Number of replies taken so far."""

    @property
    def total_weight(self) -> float:
        """Sum of the weights of the replies taken so far."""

    def add(self, reply: TrainReply) -> None:
        """Take one validated reply into the mean."""

    def result(self) -> ParameterSet:
        """Return the weighted mean in the global model's dtypes."""


class PlainMean:
    """Weighted mean of replies in the clear, streaming one reply at a time."""

    def __init__(self, reference: Mapping[str, np.ndarray]) -> None:
        self._mean = WeightedMean(reference)

    @property
    def count(self) -> int:
        return self._mean.count

    @property
    def total_weight(self) -> float:
        return self._mean.total_weight

    def add(self, reply: TrainReply) -> None:
        self._mean.add(reply.params, float(reply.num_samples))

    def result(self) -> ParameterSet:
        return self._mean.result()


class Strategy(ABC):
    """Configure rounds and aggregate replies into a new global model."""

    name: ClassVar[str]
    needs_individual_updates: ClassVar[bool] = False

    def __init__(self, sites_per_round: int | None = None,
                 local_config: Mapping[str, Any] | None = None) -> None:
        if sites_per_round is not None and sites_per_round < 1:
            raise ConfigError(
                f"sites_per_round must be at least 1; got {sites_per_round}")
        self.sites_per_round = sites_per_round
        self.local_config = dict(local_config or {})
        self.trainable: frozenset[str] = frozenset()

    def initialize(self, params: Mapping[str, np.ndarray],
                   trainable: Iterable[str]) -> None:
        """Learn which tensors are trainable before the first round."""
        self.trainable = frozenset(trainable)

    def select_sites(self, server_round: int, sites: Sequence[str],
                     rng: np.random.Generator) -> list[str]:
        """Choose the sites of a round: all, or a seeded sample of them."""
        if self.sites_per_round is None or self.sites_per_round >= len(sites):
            return list(sites)
        chosen = rng.choice(len(sites), size=self.sites_per_round, replace=False)
        return [sites[i] for i in sorted(chosen)]

    def configure_train(self, server_round: int, params: Mapping[str, np.ndarray],
                        sites: Sequence[str], rng: np.random.Generator
                        ) -> list[TrainInstruction]:
        """Return one training instruction per selected site."""
        return [TrainInstruction(site, server_round, dict(self.local_config))
                for site in self.select_sites(server_round, sites, rng)]

    def check_update(self, reply: TrainReply,
                     params: Mapping[str, np.ndarray]) -> None:
        """Raise UpdateRejected when a reply's model does not match the global model.

        The engine calls this before :meth:`check_reply`. The default checks
        names, shapes, dtypes and finite values against ``params``. A strategy
        whose replies carry no model in the clear (homomorphic encryption)
        checks their own form instead.
        """
        validate_update(reply.site, params, reply.params)

    def check_reply(self, reply: TrainReply,  # noqa: B027 - optional hook
                    params: Mapping[str, np.ndarray]) -> None:
        """Raise UpdateRejected when a reply lacks what this strategy needs.

        The engine calls this after the generic checks of names, shapes and
        dtypes; the default accepts every reply. Strategies that read
        ``reply.extra`` (SCAFFOLD's control variates) check it here, so a bad
        reply is left out of the round instead of failing the aggregation.
        """

    def begin_aggregation(self, server_round: int,
                          params: Mapping[str, np.ndarray]) -> MeanAggregator:
        """Return the aggregator that takes this round's replies as they come."""
        return PlainMean(params)

    @abstractmethod
    def finish_aggregation(self, server_round: int,
                           params: Mapping[str, np.ndarray],
                           aggregator: MeanAggregator) -> ParameterSet:
        """Turn the round's aggregate into the next global model."""

    def aggregate_train(self, server_round: int, params: Mapping[str, np.ndarray],
                        replies: Iterable[TrainReply]) -> ParameterSet | None:
        """Aggregate validated replies; return None when their weight is zero."""
        aggregator = self.begin_aggregation(server_round, params)
        for reply in replies:
            if reply.num_samples > 0:
                aggregator.add(reply)
        if aggregator.total_weight <= 0:
            return None
        return self.finish_aggregation(server_round, params, aggregator)

    def aggregate_sum(self, server_round: int, params: Mapping[str, np.ndarray],
                      private_sum: PrivateSum) -> ParameterSet | None:
        """Aggregate a private sum of updates; return None when its weight is zero."""
        if self.needs_individual_updates:
            raise NotSupportedError(f"strategy {self.name} needs each site's update, "
                                    "which a private sum hides")
        if private_sum.total_weight <= 0:
            return None
        return self.finish_aggregation(server_round, params,
                                       SumMean(params, private_sum))

    def state_dict(self) -> dict[str, Any]:
        """Return the state to save between rounds (JSON values and arrays)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]  # noqa: B027 - optional hook
                        ) -> None:
        """Restore the state returned by :meth:`state_dict`."""


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017): the sample-weighted mean."""

    name = "fedavg"

    def finish_aggregation(self, server_round: int,
                           params: Mapping[str, np.ndarray],
                           aggregator: MeanAggregator) -> ParameterSet:
        return copy_params(aggregator.result())
