"""Differential privacy in a deployed federation: config section, strategy, sites.

The coordinator reads the ``[privacy]`` section of the federation config,
wraps its strategy in :class:`~prifed.privacy.strategy.PrivateStrategy` and
so sends the DP settings with every training task. A site started with
``prifed site --privacy-dir DIR`` trains through
:class:`~prifed.privacy.client.PrivateSiteClient`, whose policy file and
ledger live in that folder on the site's own disk: nothing the coordinator
sends changes the limit or resets the ledger. A round past the limit is
refused with a Failure whose reason the coordinator logs; the run goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from prifed.core.strategy import Strategy
    from prifed.deploy.config import FederationConfig
    from prifed.privacy.client import PrivateSiteClient
    from prifed.privacy.settings import DPSettings
    from prifed.training.client import SiteClient


class PrivacySection(BaseModel):
    """The ``[privacy]`` section: the DP settings the coordinator proposes.

    ``planned_rounds`` is ``training.rounds`` and ``run_id`` the federation's
    name; a site checks every proposal against its own policy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["record", "site"]
    delta: float = Field(default=1e-5, gt=0, lt=1)
    target_epsilon: float | None = Field(default=None, gt=0)
    noise_multiplier: float | None = Field(default=None, ge=0)
    clip_norm: float = Field(default=1.0, gt=0)
    accountant: Literal["rdp", "pld"] = "rdp"
    noise_placement: Literal["coordinator", "sites"] = "coordinator"
    min_sites: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_noise_setting(self) -> PrivacySection:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of target_epsilon and "
                             f"noise_multiplier; got {self.target_epsilon} and "
                             f"{self.noise_multiplier}")
        return self

    def settings(self, rounds: int, run_id: str) -> DPSettings:
        """Return the DP settings every training task carries."""
        from prifed.privacy.settings import DPSettings

        return DPSettings(self.mode, self.delta, self.target_epsilon,
                          self.noise_multiplier, self.clip_norm, rounds,
                          self.accountant, self.noise_placement, self.min_sites,
                          run_id)


def private_strategy(config: FederationConfig, strategy: Strategy) -> Strategy:
    """Wrap the coordinator's strategy in DP when the config has a privacy section."""
    section = config.privacy
    if section is None:
        return strategy
    from prifed.privacy.strategy import PrivateStrategy

    settings = section.settings(config.training.rounds, config.federation.name)
    return PrivateStrategy(strategy, settings)


def private_client(privacy_dir: Path) -> Callable[[SiteClient], PrivateSiteClient]:
    """Return a wrapper that turns a site's trainer into a private one.

    The wrapper builds a :class:`PrivateSiteClient` on the same rows, model
    and seed, with the policy and ledger of ``privacy_dir``. The policy file
    is read at once, so a missing or invalid one stops the agent at start.
    """
    from prifed.privacy.policy import load_policy

    load_policy(privacy_dir)

    def wrap(client: SiteClient) -> PrivateSiteClient:
        from prifed.privacy.client import PrivateSiteClient

        return PrivateSiteClient(client.name, client.model_factory, client.train_x,
                                 client.train_y, client.test_x, client.test_y,
                                 client.seed, privacy_dir)

    return wrap
