"""The site side of DP: a site client that trains only with DP and keeps a ledger.

:class:`PrivateSiteClient` is a :class:`~prifed.training.client.SiteClient`
whose site has a privacy folder holding its policy file and its ledger. For
every training instruction it:

1. reads the DP settings the coordinator proposes and refuses an instruction
   without them, with a mode the policy does not allow, with less noise than
   the policy's minimum, or with config keys it would silently ignore;
2. checks the model for layers DP-SGD cannot train (record level);
3. computes this round's mechanism and refuses, with :class:`BudgetExhausted`,
   when the ledger's total would pass the policy's limit;
4. trains (DP-SGD, or plain local SGD followed by clipping and, with secure
   aggregation, its noise share), records the round in the ledger, and only
   then returns the reply.

A refusal raises a :class:`~prifed.errors.PriFedError`, which the transport
turns into a ``Failure`` whose reason the coordinator logs and reports. The
reply's metrics carry the site's spend and never the training loss, which
DP does not cover.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prifed.core.messages import TrainInstruction, TrainReply
from prifed.errors import PriFedError
from prifed.log import get_logger, round_label
from prifed.privacy.accountant import GaussianEvent, calibrate_noise_multiplier, \
    sampling_rate
from prifed.privacy.dpsgd import DPSGDTrainer
from prifed.privacy.errors import PolicyError
from prifed.privacy.ledger import LedgerEntry, PrivacyLedger
from prifed.privacy.policy import LEDGER_FILE, POLICY_FILE, SitePolicy, load_policy
from prifed.privacy.settings import CONFIG_KEY, DPSettings
from prifed.privacy.sitelevel import add_noise_share, clip_update
from prifed.privacy.validation import validate_for_dp
from prifed.training.client import SiteClient
from prifed.training.models import get_params, set_params

logger = get_logger(__name__)

TRAINING_KEYS = frozenset({"local_steps", "batch_size", "lr", "optimizer"})
"""Instruction config keys a private site understands besides ``dp``."""


class PrivateSiteClient(SiteClient):
    """A site that trains only with differential privacy, within its own limit.

    ``privacy_dir`` is the site's own folder with ``privacy-policy.json``
    (written by the site) and ``privacy-ledger.sqlite``. ``noise_seed`` seeds
    the sampling and the noise; None draws it from the operating system.
    """

    def __init__(self, name: str, model_factory: Callable[[], nn.Module],
                 train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, seed: int, privacy_dir: Path,
                 noise_seed: int | None = None) -> None:
        super().__init__(name, model_factory, train_x, train_y, test_x, test_y, seed)
        self.privacy_dir = privacy_dir
        load_policy(privacy_dir)
        self.ledger = PrivacyLedger(privacy_dir / LEDGER_FILE, name)
        if noise_seed is None:
            noise_seed = secrets.randbits(63)
        generator = torch.Generator()
        generator.manual_seed(noise_seed)
        self.dp_trainer = DPSGDTrainer(train_x, train_y, generator)
        self.noise_rng = np.random.default_rng(noise_seed)
        self._calibrated: dict[tuple[Any, ...], float] = {}

    def fit(self, params: Mapping[str, np.ndarray],
            instruction: TrainInstruction) -> TrainReply:
        """Train one DP round within the site's budget, or raise why not."""
        started = time.perf_counter()
        try:
            reply = self._fit(params, instruction)
        except PriFedError as error:
            logger.warning("fit round %d: site %s does not train: %s",
                           instruction.server_round, self.name, error)
            raise
        reply.metrics["train_seconds"] = time.perf_counter() - started
        return reply

    def _fit(self, params: Mapping[str, np.ndarray],
             instruction: TrainInstruction) -> TrainReply:
        policy = load_policy(self.privacy_dir)
        settings = self.read_settings(instruction.config, policy)
        if settings.mode == "record":
            model, event, num_samples = self._fit_record(params, instruction,
                                                         settings, policy)
            local = get_params(model)
        else:
            local, event = self._fit_site(params, instruction, settings, policy)
            num_samples = 1
        entry = self.ledger.record(
            event, policy, run_id=settings.run_id,
            server_round=instruction.server_round, mode=settings.mode,
            noise_placement=_placement(settings), clip_norm=settings.clip_norm)
        return TrainReply(self.name, instruction.server_round, local, num_samples,
                          privacy_metrics(entry, policy))

    def read_settings(self, config: Mapping[str, Any],
                      policy: SitePolicy) -> DPSettings:
        """Parse the proposed DP settings and check them against the policy."""
        if CONFIG_KEY not in config:
            raise PolicyError(f"site {self.name!r} trains only with differential "
                              "privacy, and the instruction has no 'dp' settings "
                              f"(its {POLICY_FILE})")
        unknown = sorted(set(config) - TRAINING_KEYS - {CONFIG_KEY})
        if unknown:
            raise PolicyError(f"site {self.name!r} cannot apply config key "
                              f"{unknown[0]!r} under DP; supported keys are "
                              f"{', '.join(sorted(TRAINING_KEYS))} and dp")
        settings = DPSettings.from_config(config[CONFIG_KEY])
        if settings.mode not in policy.allowed_modes:
            raise PolicyError(f"site {self.name!r} does not allow DP mode "
                              f"{settings.mode!r}; its {POLICY_FILE} allows "
                              f"{', '.join(policy.allowed_modes)}")
        return settings

    def _fit_record(self, params: Mapping[str, np.ndarray],
                    instruction: TrainInstruction, settings: DPSettings,
                    policy: SitePolicy) -> tuple[nn.Module, GaussianEvent, int]:
        config = instruction.config
        steps = int(config.get("local_steps", 100))
        batch_size = float(config.get("batch_size", 4))
        rate = sampling_rate(batch_size, self.num_train)
        sigma = self._record_noise(settings, rate, steps)
        event = GaussianEvent(sigma, rate, steps)
        self._check_noise(sigma, policy)

        model = self.model_factory()
        set_params(model, params)
        model.train()
        validate_for_dp(model)
        self.ledger.check(event, policy, POLICY_FILE)
        result = self.dp_trainer.train(
            model, steps=steps, expected_batch_size=batch_size,
            noise_multiplier=sigma, clip_norm=settings.clip_norm,
            lr=float(config.get("lr", 0.001)),
            optimizer=str(config.get("optimizer", "sgd")))
        logger.info("fit %s: site %s ran %d DP-SGD steps (%d empty), sampling "
                    "rate %.4g, noise multiplier %.4g",
                    _label(instruction, settings), self.name, steps,
                    result.empty_steps, rate, sigma)
        return model, event, self.num_train

    def _fit_site(self, params: Mapping[str, np.ndarray],
                  instruction: TrainInstruction, settings: DPSettings,
                  policy: SitePolicy) -> tuple[dict[str, np.ndarray], GaussianEvent]:
        settings = settings.with_site_noise()
        assert settings.noise_multiplier is not None
        sigma = settings.noise_multiplier
        event = GaussianEvent(sigma, 1.0, 1)
        self._check_noise(sigma, policy)
        if settings.noise_placement == "sites" and settings.min_sites is None:
            raise PolicyError(f"site {self.name!r} cannot size its noise share: "
                              "the dp settings name no min_sites")
        self.ledger.check(event, policy, POLICY_FILE)

        model = self.model_factory()
        set_params(model, params)
        training = {key: value for key, value in instruction.config.items()
                    if key in TRAINING_KEYS}
        self.trainer.train(model, training)
        clipped, _ = clip_update(get_params(model), params, settings.clip_norm)
        if settings.noise_placement == "sites":
            assert settings.min_sites is not None
            clipped = add_noise_share(clipped, sigma, settings.clip_norm,
                                      settings.min_sites, self.noise_rng)
        logger.info("fit %s: site %s clipped its update to norm %g%s",
                    _label(instruction, settings), self.name, settings.clip_norm,
                    " and added its noise share"
                    if settings.noise_placement == "sites" else "")
        return clipped, event

    def _record_noise(self, settings: DPSettings, rate: float, steps: int) -> float:
        """Return the noise multiplier: given, or calibrated to this site's rate."""
        if settings.noise_multiplier is not None:
            return settings.noise_multiplier
        assert settings.target_epsilon is not None
        key = (settings.target_epsilon, settings.delta, rate,
               steps * settings.planned_rounds, settings.accountant)
        if key not in self._calibrated:
            self._calibrated[key] = calibrate_noise_multiplier(
                settings.target_epsilon, settings.delta, rate,
                steps * settings.planned_rounds, settings.accountant)
            logger.info("dp: site %s calibrated noise multiplier %.4g for epsilon "
                        "%g at delta %g over %d rounds", self.name,
                        self._calibrated[key], settings.target_epsilon,
                        settings.delta, settings.planned_rounds)
        return self._calibrated[key]

    def _check_noise(self, sigma: float, policy: SitePolicy) -> None:
        if sigma < policy.min_noise_multiplier:
            raise PolicyError(
                f"site {self.name!r} requires a noise multiplier of at least "
                f"{policy.min_noise_multiplier:g}; the round asks for {sigma:.4g} "
                f"(its {POLICY_FILE})")


def privacy_metrics(entry: LedgerEntry, policy: SitePolicy) -> dict[str, float]:
    """Return the spend a site reports with its reply (values, no data)."""
    return {"dp_epsilon": entry.epsilon_total, "dp_delta": entry.delta,
            "dp_epsilon_limit": policy.limit,
            "dp_noise_multiplier": entry.noise_multiplier,
            "dp_sample_rate": entry.sample_rate, "dp_steps": float(entry.steps),
            "dp_noise_at_sites": float(entry.noise_placement == "sites")}


def _placement(settings: DPSettings) -> str:
    return settings.noise_placement if settings.mode == "site" else "site-local"


def _label(instruction: TrainInstruction, settings: DPSettings) -> str:
    return round_label(instruction.server_round, settings.planned_rounds)
