"""The transport interface between the round engine and the sites.

The in-process transport calls site objects directly; the network transport
carries the same messages over HTTPS. The round engine sees only this interface.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np

from prifed.core.messages import EvaluateReply, Failure, TrainInstruction, TrainReply


class Transport(Protocol):
    """Delivers instructions to sites and brings their replies back."""

    def site_ids(self) -> list[str]:
        """Return the sites that can take work now."""

    def train(self, server_round: int, params: Mapping[str, np.ndarray],
              instructions: Sequence[TrainInstruction]
              ) -> Iterator[TrainReply | Failure]:
        """Send the global model and instructions; yield replies as they arrive."""

    def evaluate(self, server_round: int, params: Mapping[str, np.ndarray],
                 sites: Sequence[str]) -> list[EvaluateReply | Failure]:
        """Ask sites to evaluate the global model on their test sets."""
