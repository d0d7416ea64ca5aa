"""Secure aggregation in the in-process simulation: sites train, then mask.

:class:`SecureAggregationTransport` wraps the in-process transport. Sites
train as before, but instead of shipping their updates each one runs the
secure aggregation protocol with a coordinator-side combiner, so the round
engine receives only the private sum (see
:class:`prifed.core.secure_sum.SecureSumTransport`). :func:`secure_transport`
makes one after the start-up checks.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

import numpy as np

from prifed.core.messages import (
    EvaluateReply,
    Failure,
    TrainInstruction,
    TrainReply,
)
from prifed.core.params import copy_params
from prifed.core.secure_sum import PrivateSumAborted, SecureRound, SiteEncoder, \
    WrappedSecureTransport
from prifed.errors import ConfigError, NotSupportedError, UpdateRejected
from prifed.log import get_logger
from prifed.secagg.config import SecAggConfig
from prifed.secagg.driver import SecAggBackend, exchange

logger = get_logger(__name__)

MODES = ("off", "secagg", "secagg+")
"""Values of the ``secure_aggregation`` setting."""

Dropouts = Callable[[int], Mapping[str, Collection[str]]]
"""Given a round, the sites that stop replying from each protocol phase on."""


class PlainTransport(Protocol):
    """The interface that the secure transport needs from the transport it wraps."""

    def site_ids(self) -> list[str]: ...

    def train(self, server_round: int, params: Mapping[str, np.ndarray],
              instructions: Sequence[TrainInstruction]
              ) -> Collection[TrainReply | Failure] | object: ...

    def evaluate(self, server_round: int, params: Mapping[str, np.ndarray],
                 sites: Sequence[str]) -> list[EvaluateReply | Failure]: ...


class SecureAggregationTransport(WrappedSecureTransport):
    """Run local training in process, then one secure aggregation per round."""

    def __init__(self, inner: PlainTransport, backend: SecAggBackend,
                 dropouts: Dropouts | None = None) -> None:
        super().__init__(inner)
        self.inner: PlainTransport = inner
        self.backend = backend
        self.dropouts = dropouts

    def train_secure(self, server_round: int, params: Mapping[str, np.ndarray],
                     instructions: Sequence[TrainInstruction]) -> SecureRound:
        """Have the sites train, then sum their updates by secure aggregation."""
        reference = copy_params(params)
        outcome = SecureRound()
        encoders: dict[str, SiteEncoder] = {}
        metrics: dict[str, dict[str, float]] = {}
        replies = self.inner.train(server_round, params, instructions)
        for reply in replies:  # type: ignore[attr-defined]
            if isinstance(reply, Failure):
                outcome.failures[reply.site] = reply.reason
                continue
            try:
                encoders[reply.site] = self.backend.site_encoder(
                    reply.site, server_round, reference, reply.params,
                    reply.num_samples)
            except UpdateRejected as error:
                outcome.failures[reply.site] = f"update rejected at the site: " \
                                               f"{error.reason}"
                continue
            metrics[reply.site] = dict(reply.metrics)
        planned = self.dropouts(server_round) if self.dropouts else None
        try:
            combiner = self.backend.combiner(server_round, list(encoders), reference)
            private_sum = exchange(combiner, encoders, dropouts=planned)
        except (PrivateSumAborted, ConfigError) as error:
            outcome.aborted = f"secure aggregation aborted, round skipped and the " \
                              f"previous model kept: {error}"
            return outcome
        outcome.private_sum = private_sum
        outcome.metrics = {site: metrics[site] for site in private_sum.sites}
        outcome.failures.update(private_sum.dropped)
        return outcome


def check_strategy(mode: str, strategy: object) -> None:
    """Raise NotSupportedError when a strategy needs each site's update."""
    if getattr(strategy, "needs_individual_updates", False):
        name = getattr(strategy, "name", type(strategy).__name__)
        raise NotSupportedError(
            f"strategy {name!r} needs each site's update, which secure aggregation "
            f"({mode}) hides from the coordinator; choose a strategy that needs "
            "only the weighted mean (fedavg, fedprox, fedadam, fedyogi, "
            "fedadagrad) or set secure aggregation to off")


def secure_transport(mode: str, strategy: object, inner: PlainTransport,
                     reference: Mapping[str, np.ndarray],
                     sites_per_round: int | None = None,
                     config: SecAggConfig | None = None,
                     dropouts: Dropouts | None = None) -> SecureAggregationTransport:
    """Check the run at start-up and wrap ``inner`` in secure aggregation.

    Raises NotSupportedError for a strategy that needs individual updates and
    ConfigError when a round's sum could wrap or has too few sites, before
    any round starts.
    """
    if mode not in MODES[1:]:
        raise ConfigError(f"secure_aggregation must be one of {', '.join(MODES)}; "
                          f"got {mode!r}")
    check_strategy(mode, strategy)
    if config is None:
        config = SecAggConfig(mode=mode)
    elif config.mode != mode:
        raise ConfigError(f"secure aggregation mode {mode!r} does not match the "
                          f"config's mode {config.mode!r}")
    backend = SecAggBackend(config)
    sites = len(inner.site_ids())
    per_round = min(sites_per_round or sites, sites)
    backend.check(per_round, reference)
    logger.info("secure aggregation %s: %d sites per round, threshold %s, clip %g, "
                "precision 2**-%d", mode, per_round, config.threshold,
                config.encoding.clip, config.encoding.precision_bits)
    return SecureAggregationTransport(inner, backend, dropouts)
