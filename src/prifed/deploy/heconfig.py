"""CKKS settings of a deployed federation: the config section and the strategy.

The ``[homomorphic]`` section names the coordinator's context file (from
``prifed he keygen``, without the secret key). The coordinator then wraps its
strategy in :class:`~prifed.he.strategy.HomomorphicStrategy` and names, in
every site's setup block, the server optimiser to run on the decrypted sums.
The site side is :mod:`prifed.deploy.hesite`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from prifed.errors import ConfigError
from prifed.log import get_logger

if TYPE_CHECKING:
    from prifed.core.strategy import Strategy
    from prifed.deploy.config import FederationConfig

logger = get_logger(__name__)

SETUP_KEY = "homomorphic"
"""Key of the CKKS block in the setup every site receives with its tasks."""


class HomomorphicSection(BaseModel):
    """The ``[homomorphic]`` section: the coordinator's context file, no secret key.

    ``coordinator_key`` is relative to the federation config.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    coordinator_key: Path


def homomorphic_strategy(config: FederationConfig, strategy: Strategy) -> Strategy:
    """Wrap the strategy in CKKS aggregation when the config has the section."""
    section = config.homomorphic
    if section is None:
        return strategy
    if config.privacy is not None:
        raise ConfigError("homomorphic aggregation does not run with DP yet; "
                          "remove [privacy] or [homomorphic] from the config")
    if config.training.secure_aggregation != "off":
        raise ConfigError("homomorphic aggregation already hides every update; set "
                          "training.secure_aggregation to \"off\" (got "
                          f"{config.training.secure_aggregation!r})")
    from prifed.he.keys import read_key_file
    from prifed.he.strategy import HomomorphicStrategy

    path = section.coordinator_key
    if not path.is_absolute():
        path = config.base_dir / path
    key = read_key_file(path)
    logger.info("setup: CKKS key %s for %d sites; the coordinator holds no secret "
                "key", key.key_id, key.params.num_sites)
    return HomomorphicStrategy(strategy, key)


def setup_block(config: FederationConfig) -> dict[str, Any]:
    """Return the CKKS part of each site's setup: the server optimiser to run."""
    if config.homomorphic is None:
        return {}
    return {SETUP_KEY: {"strategy": config.training.strategy,
                        "strategy_options": dict(config.training.strategy_options)}}
