"""Strategies selectable by name: the registry behind ``--strategy``.

=============  ==============================================================
fedavg         sample-weighted mean of the replies (McMahan et al. 2017)
fedprox        FedAvg plus a proximal term at the sites (Li et al. 2020)
scaffold       control variates at sites and coordinator (Karimireddy et al.)
fedadam        server Adam on the mean pseudo-gradient (Reddi et al. 2021)
fedyogi        server Yogi on the mean pseudo-gradient (Reddi et al. 2021)
fedadagrad     server Adagrad on the mean pseudo-gradient (Reddi et al. 2021)
fedbuff        asynchronous buffered aggregation (Nguyen et al. 2022)
=============  ==============================================================
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from typing import Any

from prifed.core.strategy import FedAvg, Strategy
from prifed.errors import ConfigError
from prifed.strategies.fedbuff import FedBuff
from prifed.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from prifed.strategies.fedprox import FedProx
from prifed.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedProx, Scaffold, FedAdam, FedYogi, FedAdagrad, FedBuff)
}


def build_strategy(name: str, **options: Any) -> Strategy:
    """Build a registered strategy by name with its options."""
    try:
        cls = STRATEGIES[name.lower()]
    except KeyError:
        raise ConfigError(f"strategy must be one of {', '.join(sorted(STRATEGIES))}; "
                          f"got {name!r}") from None
    accepted = strategy_options(cls)
    unknown = sorted(set(options) - accepted - {"sites_per_round", "local_config"})
    if unknown:
        raise ConfigError(f"strategy {cls.name!r} has no option {unknown[0]!r}; its "
                          f"options are {', '.join(sorted(accepted)) or 'none'}")
    return cls(**options)


def strategy_options(cls: type[Strategy]) -> set[str]:
    """Return the names of the options a strategy class takes beyond the common two."""
    parameters = inspect.signature(cls.__init__).parameters
    return {name for name in parameters
            if name not in ("self", "sites_per_round", "local_config")}


@dataclass(frozen=True)
class StrategySpec:
    """One strategy of a comparison: its registered name and its options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Return the name, with the options when there are any."""
        if not self.options:
            return self.name
        text = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}({text})"


def parse_strategy_specs(text: str) -> list[StrategySpec]:
    """Parse ``fedavg,fedyogi:server_lr=0.03:tau=0.001`` into strategy specs.

    Strategies are separated by commas; each may carry ``:key=value`` options,
    whose values are read as JSON (numbers, true, false, null) or else as text.
    """
    specs = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, *pairs = item.split(":")
        name = name.strip().lower()
        if name not in STRATEGIES:
            raise ConfigError(f"strategy must be one of "
                              f"{', '.join(sorted(STRATEGIES))}; got {name!r}")
        options: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"strategy option must read key=value; got "
                                  f"{pair!r} in {item!r}")
            options[key.strip()] = _parse_value(value.strip())
        accepted = sorted(strategy_options(STRATEGIES[name]))
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(f"strategy {name!r} has no option {unknown[0]!r}; its "
                              f"options are {', '.join(accepted) or 'none'}")
        specs.append(StrategySpec(name, options))
    if not specs:
        raise ConfigError(f"strategy list is empty: {text!r}")
    return specs


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
