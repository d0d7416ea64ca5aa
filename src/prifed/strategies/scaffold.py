"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates against client drift.

The coordinator keeps a control variate ``c`` per trainable float tensor and
sends it with every instruction (``extra["control/<tensor>"]``). A site keeps
its own ``c_i`` across rounds and restarts, trains with the gradient
corrected by ``c - c_i``, and after ``K`` plain SGD steps of learning rate
``lr`` updates it by option II of the paper:

    c_i+ = c_i - c + (x - y_i) / (K * lr)

It replies with its model ``y_i`` and ``extra["control_delta/<tensor>"] =
c_i+ - c_i``. The coordinator then sets

    x = x + server_lr * (mean(y_i) - x)
    c = c + sum over replying sites of n_i * delta_c_i / N

where ``mean`` is the sample-weighted mean, ``n_i`` a site's sample count
and ``N`` the sum of the latest sample counts of every site seen so far (the
paper's uniform ``1 / N`` becomes a sample weight, as in FedAvg). Buffers
take the weighted mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from prifed.core.messages import TrainInstruction, TrainReply
from prifed.core.params import ParameterSet
from prifed.core.strategy import MeanAggregator, PlainMean, Strategy
from prifed.errors import ConfigError
from prifed.log import get_logger
from prifed.strategies.base import (CONTROL_DELTA_PREFIX, CONTROL_PREFIX,
                                    SCAFFOLD_KEY, apply_server_step,
                                    check_extra_tensors, require_positive,
                                    stepped_names)

logger = get_logger(__name__)


class ScaffoldMean:
    """The weighted mean of the models plus the weighted sum of control deltas."""

    def __init__(self, params: Mapping[str, np.ndarray], names: Sequence[str]) -> None:
        self._plain = PlainMean(params)
        self.delta_sums = {n: np.zeros(params[n].shape) for n in names}
        self.site_weights: dict[str, float] = {}

    @property
    def count(self) -> int:
        return self._plain.count

    @property
    def total_weight(self) -> float:
        return self._plain.total_weight

    def add(self, reply: TrainReply) -> None:
        """Take one reply's model and its control-variate delta."""
        self._plain.add(reply)
        weight = float(reply.num_samples)
        for name, total in self.delta_sums.items():
            delta = reply.extra[CONTROL_DELTA_PREFIX + name]
            total += weight * delta.astype(np.float64)
        self.site_weights[reply.site] = weight

    def result(self) -> ParameterSet:
        return self._plain.result()


class Scaffold(Strategy):
    """SCAFFOLD: server and site control variates correct each local step."""

    name = "scaffold"
    # The control-variate deltas travel in reply.extra, outside the mean that
    # a secure aggregator computes.
    needs_individual_updates = True

    def __init__(self, sites_per_round: int | None = None,
                 local_config: Mapping[str, Any] | None = None,
                 server_lr: float = 1.0) -> None:
        super().__init__(sites_per_round, local_config)
        optimizer = self.local_config.get("optimizer", "sgd")
        if optimizer != "sgd":
            raise ConfigError("scaffold needs plain SGD at the sites, because its "
                              "control-variate update divides the model change by "
                              f"steps * lr; got optimizer {optimizer!r}")
        self.server_lr = require_positive("server_lr", server_lr)
        self.control: dict[str, np.ndarray] = {}
        self.site_weights: dict[str, float] = {}
        self._initialized = False

    def initialize(self, params: Mapping[str, np.ndarray],
                   trainable: Iterable[str]) -> None:
        """Learn the trainable tensors and start the server control variate at 0."""
        super().initialize(params, trainable)
        self.control = {n: np.zeros(params[n].shape)
                        for n in stepped_names(params, self.trainable)}
        self.site_weights = {}
        self._initialized = True

    def configure_train(self, server_round: int, params: Mapping[str, np.ndarray],
                        sites: Sequence[str], rng: np.random.Generator
                        ) -> list[TrainInstruction]:
        """Return instructions that carry the server control variate."""
        self._require_initialized()
        extra = {CONTROL_PREFIX + n: c.astype(params[n].dtype)
                 for n, c in self.control.items()}
        config = {**self.local_config, SCAFFOLD_KEY: True}
        return [TrainInstruction(site, server_round, dict(config), dict(extra))
                for site in self.select_sites(server_round, sites, rng)]

    def check_reply(self, reply: TrainReply,
                    params: Mapping[str, np.ndarray]) -> None:
        """Reject a reply whose control deltas are missing or malformed."""
        expected = {CONTROL_DELTA_PREFIX + n: np.empty(params[n].shape,
                                                       params[n].dtype)
                    for n in self.control}
        check_extra_tensors(reply.site, reply.extra, expected)

    def begin_aggregation(self, server_round: int,
                          params: Mapping[str, np.ndarray]) -> MeanAggregator:
        """Return an aggregator that also sums the weighted control deltas."""
        self._require_initialized()
        return ScaffoldMean(params, list(self.control))

    def finish_aggregation(self, server_round: int,
                           params: Mapping[str, np.ndarray],
                           aggregator: MeanAggregator) -> ParameterSet:
        """Move the model by ``server_lr`` and the control variate by the deltas."""
        if not isinstance(aggregator, ScaffoldMean):
            raise ConfigError("scaffold needs its own aggregator (the sum of "
                              "control deltas); got "
                              f"{type(aggregator).__name__}")
        mean = aggregator.result()
        steps = {n: self.server_lr * (mean[n].astype(np.float64)
                                      - params[n].astype(np.float64))
                 for n in self.control}
        self.site_weights.update(aggregator.site_weights)
        known_weight = sum(self.site_weights.values())
        for name, c in self.control.items():
            c += aggregator.delta_sums[name] / known_weight
        logger.debug("aggregate round %d: scaffold took %d control deltas, "
                     "%d sites known", server_round, aggregator.count,
                     len(self.site_weights))
        return apply_server_step(params, mean, steps)

    def state_dict(self) -> dict[str, Any]:
        """Return the server control variate, site weights and trainable names."""
        return {"trainable": sorted(self.trainable),
                "control": {n: c.copy() for n, c in self.control.items()},
                "site_weights": dict(self.site_weights)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self.trainable = frozenset(state["trainable"])
        self.control = {n: np.array(c, np.float64)
                        for n, c in state["control"].items()}
        self.site_weights = {str(k): float(v)
                             for k, v in state["site_weights"].items()}
        self._initialized = True

    def _require_initialized(self) -> None:
        if not self._initialized:
            raise ConfigError("scaffold needs initialize() (or a restored state) "
                              "before its first round, to know which tensors "
                              "carry control variates")
