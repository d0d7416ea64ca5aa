"""The site side: encrypt a weighted update, decrypt the aggregate, step the model.

With CKKS the coordinator never has the global model in the clear, so each
site keeps its own copy. A round at a site is:

1. receive the encrypted aggregate of the previous round, decrypt it, divide
   by the total weight in its weight slot and apply the server optimiser step
   (every site computes the same model, from the same ciphertext);
2. train locally from that model;
3. clip ``local - global`` to the federation's value range, counting the
   clipped values, scale it by the site's weight, and encrypt it with the
   weight and a contribution count in the header slots.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from prifed.core.params import ParameterSet, copy_params, is_float, validate_update
from prifed.errors import ConfigError, ProtocolError, UpdateRejected
from prifed.he.combine import parse_ciphertexts
from prifed.he.errors import DecryptionError
from prifed.he.keys import FederationKey
from prifed.he.optim import FedAvgStep, ServerOptimizer
from prifed.he.packing import (
    COUNT_SLOT,
    HEADER_SLOTS,
    WEIGHT_SLOT,
    EncryptedAggregate,
    EncryptedUpdate,
    Layout,
    is_encrypted,
    model_digest,
)
from prifed.log import get_logger

logger = get_logger(__name__)

COUNT_TOLERANCE = 0.25
"""Largest distance of the decrypted contribution count from the site count."""


@dataclass(frozen=True)
class EncryptionReport:
    """Outcome of encrypting one update: values clipped, bytes and seconds."""

    clipped: int
    num_values: int
    num_bytes: int
    seconds: float


@dataclass(frozen=True)
class DecryptedAggregate:
    """A decrypted aggregate: the weighted mean update and its bookkeeping."""

    mean: ParameterSet
    total_weight: float
    sites: tuple[str, ...]
    error_bound: float
    seconds: float


def encrypt_update(key: FederationKey, layout: Layout, site: str, server_round: int,
                   update: Mapping[str, np.ndarray], weight: float,
                   base: str) -> tuple[EncryptedUpdate, EncryptionReport]:
    """Clip, weight and encrypt one site's update (local minus global model)."""
    started = time.perf_counter()
    params = key.params
    if not key.has_secret_key:
        raise ConfigError(f"site {site!r} loaded a context without the secret key, "
                          "which cannot encrypt; load the site context file")
    if not (np.isfinite(weight) and 0 < weight <= params.max_weight):
        raise ConfigError(
            f"site {site!r} has weight {weight}; it must be in (0, "
            f"{params.max_weight:g}], the max_weight of key {key.key_id}: rotate "
            "the key with a larger --max-weight")
    values = layout.flatten(update)
    if not np.isfinite(values).all():
        bad = next(n for n in layout.names if not np.isfinite(update[n]).all())
        raise UpdateRejected(site, "update contains NaN or infinite values", bad)

    limit = params.value_range
    clipped = int(np.count_nonzero(np.abs(values) > limit))
    if clipped:
        values = np.clip(values, -limit, limit)
        logger.warning("encrypt round %d: site %s clipped %d of %d values to "
                       "±%g", server_round, site, clipped, values.size, limit)
    slots = np.empty(values.size + HEADER_SLOTS)
    slots[WEIGHT_SLOT] = weight
    slots[COUNT_SLOT] = 1.0
    slots[HEADER_SLOTS:] = values * weight

    ciphertexts = tuple(ts.ckks_vector(key.context, piece).serialize()
                        for piece in layout.split(slots))
    encrypted = EncryptedUpdate(site, server_round, key.key_id, layout.digest, base,
                                ciphertexts)
    report = EncryptionReport(clipped, values.size, encrypted.num_bytes,
                              time.perf_counter() - started)
    logger.info("encrypt round %d: site %s, %d values in %d ciphertexts, %d bytes, "
                "%d clipped, %.3f s", server_round, site, values.size,
                len(ciphertexts), report.num_bytes, clipped, report.seconds)
    return encrypted, report


def decrypt_aggregate(key: FederationKey, layout: Layout, site: str,
                      aggregate: EncryptedAggregate) -> DecryptedAggregate:
    """Decrypt an aggregate and return the weighted mean update.

    Raises DecryptionError naming the site when the context has no secret
    key, the aggregate belongs to another key or layout, a ciphertext is
    missing or damaged, or the decrypted header slots are inconsistent.
    """
    started = time.perf_counter()
    if not key.has_secret_key:
        raise DecryptionError(site, f"the context of key {key.key_id} has no "
                              "secret key (it is the coordinator's context); load "
                              "the site context file")
    if aggregate.key_id != key.key_id:
        raise DecryptionError(site, f"aggregate is under key {aggregate.key_id}; "
                              f"this site has key {key.key_id}")
    if aggregate.layout != layout.digest:
        raise DecryptionError(site, f"aggregate has model layout {aggregate.layout}; "
                              f"this site's model has {layout.digest}")
    try:
        vectors = parse_ciphertexts(key, layout, aggregate.ciphertexts)
    except ValueError as error:
        raise DecryptionError(site, str(error)) from None
    slots = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64)
                            for v in vectors])

    count = len(aggregate.sites)
    tolerance = key.params.sum_error_bound(count)
    _check_header(site, slots, aggregate, tolerance)
    total_weight = float(slots[WEIGHT_SLOT])
    magnitude = count * key.params.max_weight * key.params.value_range
    values = slots[HEADER_SLOTS:]
    if not np.isfinite(values).all() or np.abs(values).max(initial=0) > \
            magnitude + tolerance:
        raise DecryptionError(site, f"decrypted values exceed the largest possible "
                              f"sum {magnitude:g} of {count} sites, so the "
                              "aggregate is corrupt")
    mean = layout.unflatten(values / total_weight)
    bound = key.params.mean_error_bound(count, total_weight)
    seconds = time.perf_counter() - started
    logger.info("decrypt round %d: site %s, %d sites, %d ciphertexts, error bound "
                "%.2g, %.3f s", aggregate.server_round, site, count, len(vectors),
                bound, seconds)
    return DecryptedAggregate(mean, total_weight, aggregate.sites, bound, seconds)


def _check_header(site: str, slots: np.ndarray, aggregate: EncryptedAggregate,
                  error: float) -> None:
    """Check the decrypted contribution count and total weight."""
    count = len(aggregate.sites)
    decrypted = float(slots[COUNT_SLOT])
    if not abs(decrypted - count) <= max(COUNT_TOLERANCE, error):
        raise DecryptionError(
            site, f"decrypted contribution count is {decrypted:.6g} but the "
            f"aggregate lists {count} sites: a ciphertext in it was made under "
            "another key (a site with an old context?) or the aggregate was altered")
    weight = float(slots[WEIGHT_SLOT])
    if not (np.isfinite(weight) and weight > error):
        raise DecryptionError(site, f"decrypted total weight is {weight:.6g}; it "
                              "must be positive, so the aggregate is corrupt")


class HESite:
    """A site's copy of the global model, its optimiser state and its key.

    ``trainable`` names the tensors the server optimiser steps; the others
    (buffers) take the plain mean update. By default every float tensor is
    trainable.
    """

    def __init__(self, name: str, key: FederationKey,
                 optimizer: ServerOptimizer | None = None,
                 trainable: Collection[str] | None = None) -> None:
        if not key.has_secret_key:
            raise ConfigError(f"site {name!r} needs the site context with the "
                              f"secret key; key {key.key_id} has none")
        self.name = name
        self.key = key
        self.optimizer = optimizer or FedAvgStep()
        self._trainable = None if trainable is None else frozenset(trainable)
        self.model: ParameterSet | None = None
        self.layout: Layout | None = None
        self.applied_round = 0
        self.last_encryption: EncryptionReport | None = None
        self.last_decryption: DecryptedAggregate | None = None

    @property
    def trainable(self) -> frozenset[str]:
        if self._trainable is not None:
            return self._trainable
        assert self.model is not None
        return frozenset(n for n, v in self.model.items() if is_float(v))

    @property
    def digest(self) -> str:
        return model_digest(self._require_model())

    def start(self, initial: Mapping[str, np.ndarray]) -> None:
        """Take the initial global model, which every site starts from."""
        self.model = copy_params(initial)
        self.layout = Layout.of(self.model, self.key.params.slots)
        self.applied_round = 0

    def receive(self, params: Mapping[str, np.ndarray]) -> ParameterSet:
        """Take the initial model or apply an aggregate; return the global model.

        An aggregate of a round already applied changes nothing, so the same
        aggregate may arrive with both the evaluation and the next training.
        """
        if not is_encrypted(params):
            if self.model is None:
                self.start(params)
            elif model_digest(params) != self.digest:
                raise ProtocolError(
                    f"site {self.name!r} has the global model after round "
                    f"{self.applied_round} and was sent a different model in the "
                    "clear; with homomorphic aggregation only the first round "
                    "starts from a model in the clear")
            return self._require_model()
        try:
            aggregate = EncryptedAggregate.from_params(params)
        except ValueError as error:
            raise DecryptionError(self.name, f"aggregate is malformed: {error}") \
                from None
        return self.apply(aggregate)

    def apply(self, aggregate: EncryptedAggregate) -> ParameterSet:
        """Decrypt an aggregate and step the global model with the server optimiser."""
        model = self._require_model()
        if aggregate.server_round <= self.applied_round:
            return model
        if aggregate.base != self.digest:
            raise ProtocolError(
                f"site {self.name!r} has global model {self.digest} (after round "
                f"{self.applied_round}), but the aggregate of round "
                f"{aggregate.server_round} was computed from model {aggregate.base}: "
                "the site missed an aggregate; copy the global model and optimiser "
                "state from another site")
        assert self.layout is not None
        decrypted = decrypt_aggregate(self.key, self.layout, self.name, aggregate)
        self.model = self.optimizer.step(model, decrypted.mean, self.trainable)
        self.applied_round = aggregate.server_round
        self.last_decryption = decrypted
        return self.model

    def encrypt(self, local: Mapping[str, np.ndarray], weight: float,
                server_round: int) -> EncryptedUpdate:
        """Encrypt ``weight * (local - global)`` for the coordinator to add."""
        model = self._require_model()
        assert self.layout is not None
        validate_update(self.name, model, local)
        update = {name: np.asarray(local[name], np.float64)
                  - np.asarray(model[name], np.float64) for name in model}
        encrypted, report = encrypt_update(self.key, self.layout, self.name,
                                           server_round, update, weight, self.digest)
        self.last_encryption = report
        return encrypted

    def state_dict(self) -> ParameterSet:
        """Return the global model, optimiser state and round, to save as arrays."""
        model = self._require_model()
        state: ParameterSet = {f"model.{k}": v.copy() for k, v in model.items()}
        state.update({f"optimizer.{k}": v for k, v in
                      self.optimizer.state_dict().items()})
        state["applied_round"] = np.array(self.applied_round, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the state returned by :meth:`state_dict` (model order kept)."""
        self.start({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        self.optimizer.load_state_dict(
            {k[10:]: v for k, v in state.items() if k.startswith("optimizer.")})
        self.applied_round = int(state["applied_round"])

    def _require_model(self) -> ParameterSet:
        if self.model is None:
            raise ProtocolError(f"site {self.name!r} has no global model yet; it "
                                "needs the initial model before any aggregate")
        return self.model
