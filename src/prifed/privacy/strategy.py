"""The coordinator side of DP: a strategy wrapper that requests DP rounds.

:class:`PrivateStrategy` wraps a strategy that needs only the mean of the
replies. It adds the DP settings to every training instruction and, in
site-level mode with the noise at the coordinator, re-clips each update and
noises the mean before the wrapped strategy turns it into the next model.
Everything the wrapped strategy does after that (a server optimiser step) is
post-processing and spends no privacy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from prifed.core.messages import TrainInstruction, TrainReply
from prifed.core.params import ParameterSet
from prifed.core.secure_sum import PrivateSum, SumMean
from prifed.core.strategy import MeanAggregator, Strategy
from prifed.errors import NotSupportedError
from prifed.log import get_logger
from prifed.privacy.settings import CONFIG_KEY, DPSettings
from prifed.privacy.sitelevel import NoisyMean

logger = get_logger(__name__)


class PrivateStrategy(Strategy):
    """Run a mean-based strategy with record-level or site-level DP."""

    def __init__(self, inner: Strategy, settings: DPSettings,
                 seed: int | None = None) -> None:
        if inner.needs_individual_updates:
            raise NotSupportedError(
                f"strategy {inner.name!r} needs individual updates, so DP noise "
                "calibrated to the mean does not cover it; use a strategy that "
                "needs only the mean (fedavg or a server optimiser)")
        if type(inner).aggregate_train is not Strategy.aggregate_train:
            raise NotSupportedError(
                f"strategy {inner.name!r} aggregates in its own way, so the DP "
                "noise cannot be added to its mean; use fedavg or a server "
                "optimiser")
        super().__init__(inner.sites_per_round, inner.local_config)
        self.inner = inner
        self.original = settings
        self.settings = settings.with_site_noise()
        self.name = f"{inner.name}+dp-{settings.mode}"  # type: ignore[misc]
        # Coordinator noise; without a seed it comes from the OS's entropy.
        self.rng = np.random.default_rng(seed)
        if self.settings.mode == "site":
            logger.info("dp: site-level, noise multiplier %.4g, clip %g, noise "
                        "added by %s", self.settings.noise_multiplier,
                        self.settings.clip_norm, self.settings.noise_placement)

    def check_instructions(self, params: Mapping[str, np.ndarray],
                           sites: Sequence[str], supported: Iterable[str]) -> None:
        """Raise NotSupportedError, before the first round, for what sites cannot apply.

        A copy of the wrapped strategy configures round 1; a config key that
        DP training would ignore (FedProx's proximal term) or an extra tensor
        (SCAFFOLD's control variates) would change the algorithm silently.
        """
        probe = copy.deepcopy(self.inner)
        probe.initialize(params, self.trainable or params)
        allowed = set(supported)
        for instruction in probe.configure_train(1, params, sites,
                                                 np.random.default_rng(0)):
            unknown = sorted(set(instruction.config) - allowed)
            if unknown:
                raise NotSupportedError(
                    f"strategy {self.inner.name!r} sends config key {unknown[0]!r}, "
                    "which DP training at the sites does not apply; use fedavg or "
                    "a server optimiser")
            if instruction.extra:
                raise NotSupportedError(
                    f"strategy {self.inner.name!r} sends extra tensors to the "
                    "sites, which DP training does not use; use fedavg or a "
                    "server optimiser")

    @property
    def coordinator_adds_noise(self) -> bool:
        """Tell whether the coordinator noises the mean (site level, no secagg)."""
        return (self.settings.mode == "site"
                and self.settings.noise_placement == "coordinator")

    def initialize(self, params: Mapping[str, np.ndarray],
                   trainable: Iterable[str]) -> None:
        self.inner.initialize(params, trainable)
        self.trainable = self.inner.trainable

    def select_sites(self, server_round: int, sites: Sequence[str],
                     rng: np.random.Generator) -> list[str]:
        return self.inner.select_sites(server_round, sites, rng)

    def configure_train(self, server_round: int, params: Mapping[str, np.ndarray],
                        sites: Sequence[str], rng: np.random.Generator
                        ) -> list[TrainInstruction]:
        """Return the wrapped strategy's instructions with the DP settings added."""
        instructions = self.inner.configure_train(server_round, params, sites, rng)
        settings = self.settings.to_config()
        return [replace(instruction,
                        config={**instruction.config, CONFIG_KEY: dict(settings)})
                for instruction in instructions]

    def check_reply(self, reply: TrainReply,
                    params: Mapping[str, np.ndarray]) -> None:
        self.inner.check_reply(reply, params)

    def begin_aggregation(self, server_round: int,
                          params: Mapping[str, np.ndarray]) -> MeanAggregator:
        aggregator = self.inner.begin_aggregation(server_round, params)
        if not self.coordinator_adds_noise:
            return aggregator
        assert self.settings.noise_multiplier is not None
        return NoisyMean(aggregator, params, self.settings.noise_multiplier,
                         self.settings.clip_norm, self.rng)

    def aggregate_sum(self, server_round: int, params: Mapping[str, np.ndarray],
                      private_sum: PrivateSum) -> ParameterSet | None:
        """Turn a private sum into the next model, noised when the coordinator must.

        When sites add the noise, a sum over fewer than ``min_sites`` sites
        carries less noise than calibrated, so the round is skipped and the
        previous model kept.
        """
        settings = self.settings
        if settings.mode == "site" and settings.noise_placement == "sites":
            assert settings.min_sites is not None
            if len(private_sum.sites) < settings.min_sites:
                logger.error("dp round %d: the private sum covers %d sites, fewer "
                             "than the %d whose noise shares the guarantee needs; "
                             "round skipped, previous model kept", server_round,
                             len(private_sum.sites), settings.min_sites)
                return None
        if not self.coordinator_adds_noise:
            return self.inner.aggregate_sum(server_round, params, private_sum)
        if private_sum.total_weight <= 0:
            return None
        assert settings.noise_multiplier is not None
        noisy = NoisyMean(SumMean(params, private_sum), params,
                          settings.noise_multiplier, settings.clip_norm, self.rng)
        return self.inner.finish_aggregation(server_round, params, noisy)

    def finish_aggregation(self, server_round: int,
                           params: Mapping[str, np.ndarray],
                           aggregator: MeanAggregator) -> ParameterSet:
        return self.inner.finish_aggregation(server_round, params, aggregator)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(),
                "noise_rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
        if "noise_rng" in state:
            self.rng.bit_generator.state = state["noise_rng"]
