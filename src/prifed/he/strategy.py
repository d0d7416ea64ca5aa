"""Homomorphic aggregation as a round-engine strategy, for simulation and deployment.

The engine carries the coordinator's view of the global model from round to
round, and with CKKS that view is the encrypted aggregate. Round 1 starts
from the initial model in the clear, which is public because every site
starts from it. Every later round, and every evaluation, carries the
encrypted aggregate of the round before. The sites decrypt it and step their
own copies of the model (see :class:`prifed.he.client.HESiteClient`). The
engine's final result is therefore the last encrypted aggregate, and the
model itself is read at a site.

Site selection and local settings come from a plain strategy (FedAvg,
FedProx, FedAdam, FedYogi or FedAdagrad), whose server step runs at the sites.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from prifed.core.messages import TrainInstruction, TrainReply
from prifed.core.params import ParameterSet
from prifed.core.strategy import MeanAggregator, Strategy
from prifed.errors import ConfigError, NotSupportedError, UpdateRejected
from prifed.he.combine import EncryptedSum, PreparedUpdate
from prifed.he.keys import FederationKey
from prifed.he.optim import ServerOptimizer, build_server_optimizer
from prifed.he.packing import EncryptedUpdate, Layout, is_encrypted
from prifed.log import get_logger

logger = get_logger(__name__)

SERVER_STEPS = {"fedavg": "fedavg", "fedprox": "fedavg", "fedadam": "fedadam",
                "fedyogi": "fedyogi", "fedadagrad": "fedadagrad"}
"""Plain strategies that work with CKKS, and the server step their sites run."""

OPTIMIZER_OPTIONS = ("server_lr", "beta1", "beta2", "tau")


def server_step(strategy: str) -> str:
    """Return the server step for a plain strategy, or raise NotSupportedError."""
    step = SERVER_STEPS.get(strategy.lower())
    if step is None:
        raise NotSupportedError(
            f"strategy {strategy!r} does not work with homomorphic aggregation, "
            "because its coordinator needs updates or state in the clear; "
            f"choose one of {', '.join(SERVER_STEPS)}")
    return step


def site_optimizer(strategy: str, options: Mapping[str, Any]) -> ServerOptimizer:
    """Build the server step that sites run for a plain strategy and its options."""
    step = server_step(strategy)
    chosen = {k: v for k, v in options.items() if k in OPTIMIZER_OPTIONS}
    if step == "fedavg":
        chosen = {k: v for k, v in chosen.items() if k == "server_lr"}
    return build_server_optimizer(step, **chosen)


class _SumAggregator:
    """Feeds the engine's accepted replies into the round's encrypted sum."""

    def __init__(self, strategy: HomomorphicStrategy) -> None:
        self._strategy = strategy
        self._count = 0
        self._weight = 0.0

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._weight

    def add(self, reply: TrainReply) -> None:
        self._strategy.commit(reply.site)
        self._count += 1
        self._weight += float(reply.num_samples)

    def result(self) -> ParameterSet:
        return self._strategy.sealed_aggregate()


class HomomorphicStrategy(Strategy):
    """Add sites' encrypted updates; relay the encrypted sum as the next 'model'.

    ``plain`` selects sites and sets local training. ``key`` is the
    coordinator's context, without the secret key.
    """

    name = "homomorphic"

    def __init__(self, plain: Strategy, key: FederationKey) -> None:
        server_step(plain.name)
        if key.has_secret_key:
            raise ConfigError(
                f"the coordinator's context for key {key.key_id} contains the secret "
                "key, so the coordinator could decrypt every update; load the "
                "coordinator file from `prifed he keygen` instead")
        super().__init__(plain.sites_per_round, plain.local_config)
        self.plain = plain
        self.key = key
        self.layout: Layout | None = None
        self._sum: EncryptedSum | None = None
        self._pending: dict[str, PreparedUpdate] = {}

    def initialize(self, params: Mapping[str, np.ndarray],
                   trainable: Iterable[str]) -> None:
        """Learn the model layout from the initial model (public, in the clear).

        A coordinator resuming after a restart passes the last encrypted
        aggregate instead, which has no layout, so :meth:`load_state_dict`
        then restores the layout saved with the round.
        """
        super().initialize(params, trainable)
        self.plain.initialize(params, trainable)
        if not is_encrypted(params):
            self.layout = Layout.of(params, self.key.params.slots)

    def state_dict(self) -> dict[str, Any]:
        """Return the key id and model layout that a restarted coordinator needs."""
        if self.layout is None:
            return {}
        layout = self.layout
        return {"key_id": self.key.key_id,
                "layout": {"names": list(layout.names),
                           "shapes": [list(shape) for shape in layout.shapes],
                           "dtypes": list(layout.dtypes), "slots": layout.slots}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the layout saved by :meth:`state_dict` after checking its key id.

        Raises ConfigError when the saved state is of another key, because the
        sites' last aggregate is under that key.
        """
        if not state:
            return
        saved_key = state.get("key_id")
        if saved_key != self.key.key_id:
            raise ConfigError(
                f"the run's saved state is under CKKS key {saved_key}, and the "
                f"coordinator context now has key {self.key.key_id}; start the "
                "coordinator with the context the run began with, or start a new "
                "run to use the new key")
        saved = state["layout"]
        layout = Layout(tuple(str(n) for n in saved["names"]),
                        tuple(tuple(int(d) for d in s) for s in saved["shapes"]),
                        tuple(str(d) for d in saved["dtypes"]), int(saved["slots"]))
        if self.layout is not None and self.layout != layout:
            raise ConfigError(
                f"the run's saved model layout {layout.digest} differs from the "
                f"layout {self.layout.digest} of the model given to initialize()")
        self.layout = layout

    def configure_train(self, server_round: int, params: Mapping[str, np.ndarray],
                        sites: Sequence[str], rng: np.random.Generator
                        ) -> list[TrainInstruction]:
        """Open the round's encrypted sum and let the plain strategy pick sites."""
        if self.layout is None:
            raise ConfigError("homomorphic strategy needs initialize() with the "
                              "initial model before the first round")
        self._sum = EncryptedSum(self.key, self.layout, server_round)
        self._pending = {}
        return self.plain.configure_train(server_round, params, sites, rng)

    def check_update(self, reply: TrainReply,
                     params: Mapping[str, np.ndarray]) -> None:
        """Parse and check a reply's ciphertexts; the coordinator cannot read values."""
        if self._sum is None:
            raise UpdateRejected(reply.site, "no round is open for encrypted updates")
        try:
            update = EncryptedUpdate.from_params(reply.params)
        except ValueError as error:
            raise UpdateRejected(reply.site, f"encrypted update is malformed: "
                                 f"{error}") from None
        if update.site != reply.site:
            raise UpdateRejected(reply.site, "encrypted update is labelled as coming "
                                 f"from site {update.site!r}")
        self._pending[reply.site] = self._sum.prepare(update)

    @property
    def round_sum(self) -> EncryptedSum | None:
        """The encrypted sum of the current or last round, with bytes and seconds."""
        return self._sum

    def begin_aggregation(self, server_round: int,
                          params: Mapping[str, np.ndarray]) -> MeanAggregator:
        return _SumAggregator(self)

    def commit(self, site: str) -> None:
        """Add a checked site's ciphertexts to the round's sum."""
        assert self._sum is not None
        self._sum.commit(self._pending.pop(site))

    def sealed_aggregate(self) -> ParameterSet:
        """Return the encrypted sum as uint8 tensors, for the engine to relay."""
        assert self._sum is not None
        aggregate = self._sum.result()
        logger.info("aggregate round %d: encrypted sum of %d sites, %d ciphertexts, "
                    "%d bytes in, %d bytes out, %.3f s", aggregate.server_round,
                    len(aggregate.sites), len(aggregate.ciphertexts),
                    self._sum.bytes_received, aggregate.num_bytes, self._sum.seconds)
        return aggregate.to_params()

    def finish_aggregation(self, server_round: int,
                           params: Mapping[str, np.ndarray],
                           aggregator: MeanAggregator) -> ParameterSet:
        return aggregator.result()
