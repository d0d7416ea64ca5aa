"""Strategies selectable by name: the registry behind ``--strategy``."""

from __future__ import annotations

from typing import Any

from prifed.core.strategy import FedAvg, Strategy
from prifed.errors import ConfigError

STRATEGIES: dict[str, type[Strategy]] = {
    FedAvg.name: FedAvg,
}


def build_strategy(name: str, **options: Any) -> Strategy:
    """Build a registered strategy by name with its options."""
    try:
        cls = STRATEGIES[name.lower()]
    except KeyError:
        raise ConfigError(f"strategy must be one of {', '.join(sorted(STRATEGIES))}; "
                          f"got {name!r}") from None
    return cls(**options)
