"""Settings of a differentially private run, as the coordinator proposes them.

The settings travel to each site in ``TrainInstruction.config["dp"]`` as a
JSON object. A site checks them against its own policy and ledger before it
trains; the coordinator cannot lower a site's limit or reset its ledger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from prifed.errors import ConfigError
from prifed.privacy.accountant import ACCOUNTANTS, calibrate_noise_multiplier, \
    check_delta

MODES = ("record", "site")
"""record: DP-SGD on each site; site: DP-FedAvg on clipped updates."""

NOISE_PLACEMENTS = ("coordinator", "sites")
"""Placement of DP-FedAvg's noise: at the coordinator, or a share at every site."""

CONFIG_KEY = "dp"
"""Key of the settings in a training instruction's config."""


@dataclass(frozen=True)
class DPSettings:
    """One run's DP mode, noise and clipping, and the rounds it plans.

    Give either ``target_epsilon`` (the noise multiplier is calibrated so the
    planned rounds spend at most that at ``delta``) or ``noise_multiplier``.
    ``clip_norm`` bounds each record's gradient (record mode) or each site's
    update (site mode) in L2 norm. ``min_sites`` is the smallest number of
    sites whose noise shares reach the sum when sites add the noise.
    ``run_id`` labels the run in the sites' ledgers.
    """

    mode: str
    delta: float = 1e-5
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    clip_norm: float = 1.0
    planned_rounds: int = 1
    accountant: str = "rdp"
    noise_placement: str = "coordinator"
    min_sites: int | None = None
    run_id: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"dp mode must be one of {', '.join(MODES)}; "
                              f"got {self.mode!r}")
        check_delta(self.delta)
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ConfigError("give exactly one of target epsilon and noise "
                              f"multiplier; got epsilon {self.target_epsilon} and "
                              f"noise multiplier {self.noise_multiplier}")
        if self.target_epsilon is not None and not (
                0 < self.target_epsilon < math.inf):
            raise ConfigError("target epsilon must be positive and finite; got "
                              f"{self.target_epsilon}")
        if self.noise_multiplier is not None and not (
                0 <= self.noise_multiplier < math.inf):
            raise ConfigError("noise multiplier must be at least 0; got "
                              f"{self.noise_multiplier}")
        if not 0 < self.clip_norm < math.inf:
            raise ConfigError(f"clip norm must be positive; got {self.clip_norm}")
        if self.planned_rounds < 1:
            raise ConfigError("planned rounds must be at least 1; got "
                              f"{self.planned_rounds}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; "
                              f"got {self.accountant!r}")
        if self.noise_placement not in NOISE_PLACEMENTS:
            raise ConfigError("noise placement must be one of "
                              f"{', '.join(NOISE_PLACEMENTS)}; "
                              f"got {self.noise_placement!r}")
        if self.noise_placement == "sites" and self.mode != "site":
            raise ConfigError("noise placement 'sites' applies to site-level DP "
                              f"only; got mode {self.mode!r}")
        if self.min_sites is not None and self.min_sites < 1:
            raise ConfigError(f"min_sites must be at least 1; got {self.min_sites}")

    def to_config(self) -> dict[str, Any]:
        """Return the settings as a JSON object for a training instruction."""
        return asdict(self)

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> DPSettings:
        """Parse settings received in an instruction, raising ConfigError."""
        if not isinstance(values, Mapping):
            raise ConfigError("dp settings must be a JSON object; got "
                              f"{type(values).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown dp setting {unknown[0]!r}; expected one of "
                              f"{', '.join(sorted(known))}")
        if "mode" not in values:
            raise ConfigError("dp settings must name a mode")
        try:
            return cls(**dict(values))
        except TypeError as error:
            raise ConfigError(f"invalid dp settings: {error}") from None

    def with_site_noise(self) -> DPSettings:
        """Fix the site-level noise multiplier from the target, for all sites alike.

        A site takes part in a round whole, so each round is one Gaussian
        mechanism at sampling rate 1 and the planned rounds compose. Sites
        that miss rounds spend less.
        """
        if self.mode != "site" or self.noise_multiplier is not None:
            return self
        assert self.target_epsilon is not None
        sigma = calibrate_noise_multiplier(self.target_epsilon, self.delta, 1.0,
                                           self.planned_rounds, self.accountant)
        return replace(self, noise_multiplier=sigma, target_epsilon=None)
