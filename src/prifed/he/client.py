"""A site client that speaks CKKS: it decrypts what arrives and encrypts what leaves.

It wraps any site client of the plain protocol (an object with ``fit`` and
``evaluate`` taking a model in the clear) and an :class:`HESite`, which
keeps the site's copy of the global model, the server optimiser state and the
secret key. The wrapped client never sees a ciphertext and the coordinator
never sees a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from prifed.core.messages import EvaluateReply, TrainInstruction, TrainReply
from prifed.core.params import ParameterSet
from prifed.errors import NotSupportedError, ProtocolError
from prifed.he.site import HESite


class PlainSiteClient(Protocol):
    """Interface of a plain site client, as the wrapper uses it."""

    name: str

    def fit(self, params: Mapping[str, np.ndarray],
            instruction: TrainInstruction) -> TrainReply: ...

    def evaluate(self, params: Mapping[str, np.ndarray]) -> EvaluateReply: ...


class HESiteClient:
    """Decrypt the aggregate, train the wrapped client, encrypt the update."""

    def __init__(self, inner: PlainSiteClient, site: HESite,
                 on_apply: Callable[[HESite], None] | None = None) -> None:
        """Wrap ``inner`` and call ``on_apply(site)`` after each new aggregate."""
        if inner.name != site.name:
            raise ValueError(f"client {inner.name!r} and its CKKS state "
                             f"{site.name!r} must belong to the same site")
        self.inner = inner
        self.site = site
        self.name = inner.name
        self.on_apply = on_apply

    @property
    def model(self) -> ParameterSet:
        """The site's copy of the global model, in the clear."""
        if self.site.model is None:
            raise ProtocolError(f"site {self.name!r} has no global model yet")
        return self.site.model

    def fit(self, params: Mapping[str, np.ndarray],
            instruction: TrainInstruction) -> TrainReply:
        """Step the model with the relayed aggregate, train, and encrypt the update."""
        model = self._receive(params)
        reply = self.inner.fit(model, instruction)
        if reply.extra:
            raise NotSupportedError(
                f"site {self.name!r} returned extra tensors "
                f"({', '.join(reply.extra)}), which homomorphic aggregation does "
                "not carry")
        if reply.num_samples <= 0:
            raise ProtocolError(f"site {self.name!r} trained on "
                                f"{reply.num_samples} samples, so it has no update "
                                "to encrypt this round")
        encrypted = self.site.encrypt(reply.params, float(reply.num_samples),
                                      instruction.server_round)
        report = self.site.last_encryption
        metrics = dict(reply.metrics)
        if report is not None:
            metrics.update({"he_encrypt_seconds": report.seconds,
                            "he_bytes": float(report.num_bytes),
                            "he_clipped": float(report.clipped)})
        return TrainReply(self.name, instruction.server_round, encrypted.to_params(),
                          reply.num_samples, metrics)

    def evaluate(self, params: Mapping[str, np.ndarray]) -> EvaluateReply:
        """Step the model with the relayed aggregate, then evaluate it in the clear."""
        return self.inner.evaluate(self._receive(params))

    def _receive(self, params: Mapping[str, np.ndarray]) -> ParameterSet:
        before = self.site.applied_round
        model = self.site.receive(params)
        if self.on_apply is not None and self.site.applied_round != before:
            self.on_apply(self.site)
        return model
