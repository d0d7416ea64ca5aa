"""The in-process transport: sites are objects in the same Python process."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np

from prifed.core.messages import (EvaluateReply, Failure, TrainInstruction,
                                  TrainReply)
from prifed.core.params import copy_params
from prifed.errors import PriFedError
from prifed.log import get_logger

logger = get_logger(__name__)


class Site(Protocol):
    """What the in-process transport needs from a site."""

    name: str

    def fit(self, params: Mapping[str, np.ndarray],
            instruction: TrainInstruction) -> TrainReply: ...

    def evaluate(self, params: Mapping[str, np.ndarray]) -> EvaluateReply: ...


class InProcessTransport:
    """Call sites one after another; an exception becomes that site's failure."""

    def __init__(self, sites: Sequence[Site]) -> None:
        self.sites = {site.name: site for site in sites}

    def site_ids(self) -> list[str]:
        return list(self.sites)

    def train(self, server_round: int, params: Mapping[str, np.ndarray],
              instructions: Sequence[TrainInstruction]
              ) -> Iterator[TrainReply | Failure]:
        for instruction in instructions:
            site = self.sites.get(instruction.site)
            if site is None:
                yield Failure(instruction.site, server_round, "unknown site")
                continue
            try:
                # Each site gets its own copy, as it would over a network.
                yield site.fit(copy_params(params), instruction)
            except (PriFedError, ValueError, RuntimeError) as error:
                yield Failure(site.name, server_round,
                              f"{type(error).__name__}: {error}")

    def evaluate(self, server_round: int, params: Mapping[str, np.ndarray],
                 sites: Sequence[str]) -> list[EvaluateReply | Failure]:
        replies: list[EvaluateReply | Failure] = []
        for name in sites:
            try:
                replies.append(self.sites[name].evaluate(params))
            except (PriFedError, ValueError, RuntimeError) as error:
                replies.append(Failure(name, server_round,
                                       f"{type(error).__name__}: {error}"))
        return replies
