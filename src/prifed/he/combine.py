"""The coordinator side: add sites' ciphertexts with a context lacking the secret key.

The coordinator never decrypts. It checks each site's ciphertexts (key id,
model layout, base model digest, count, size), parses them with TenSEAL, and
adds them slot by slot. The encrypted sum goes back to the sites, which alone
can decrypt it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from prifed.errors import ConfigError, ProtocolError, UpdateRejected
from prifed.he.keys import FederationKey
from prifed.he.packing import EncryptedAggregate, EncryptedUpdate, Layout
from prifed.log import get_logger

logger = get_logger(__name__)


def parse_ciphertexts(key: FederationKey, layout: Layout,
                      ciphertexts: tuple[bytes, ...]) -> list[ts.CKKSVector]:
    """Parse ciphertexts under ``key`` and check their number and sizes.

    Raises ValueError whose text names the ciphertext and the problem.
    """
    expected = layout.chunk_sizes()
    if len(ciphertexts) != len(expected):
        raise ValueError(
            f"expected {len(expected)} ciphertexts for {layout.num_values:,} values "
            f"at {layout.slots:,} slots each; got {len(ciphertexts)}")
    vectors = []
    for index, (data, size) in enumerate(zip(ciphertexts, expected, strict=True)):
        where = f"ciphertext {index + 1} of {len(expected)}"
        try:
            vector = ts.ckks_vector_from(key.context, data)
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"{where} cannot be parsed ({error}): it is truncated "
                             "or was made under other CKKS parameters") from None
        if vector.size() != size:
            raise ValueError(f"{where} has {vector.size()} values; expected {size}")
        vectors.append(vector)
    return vectors


@dataclass(frozen=True)
class PreparedUpdate:
    """A checked update with its parsed ciphertexts, ready to add."""

    update: EncryptedUpdate
    vectors: list[ts.CKKSVector]


class EncryptedSum:
    """Add one round's encrypted updates without the secret key.

    ``base`` is the digest of the global model the round started from; when
    None, the first accepted update sets it, and later updates must match.
    """

    def __init__(self, key: FederationKey, layout: Layout, server_round: int,
                 base: str | None = None) -> None:
        if key.has_secret_key:
            raise ConfigError(
                f"the coordinator's context for key {key.key_id} contains the secret "
                "key, so the coordinator could decrypt every update; load the "
                "coordinator file from `prifed he keygen` instead")
        if layout.slots != key.params.slots:
            raise ConfigError(f"layout packs {layout.slots} slots per ciphertext; "
                              f"key {key.key_id} has {key.params.slots}")
        self.key = key
        self.layout = layout
        self.server_round = server_round
        self.base = base
        self.sites: list[str] = []
        self.bytes_received = 0
        self.seconds = 0.0
        self._sum: list[ts.CKKSVector] = []

    def add_params(self, site: str, params: Mapping[str, np.ndarray]) -> None:
        """Parse a site's update as the transport delivered it, then add it."""
        try:
            update = EncryptedUpdate.from_params(params)
        except ValueError as error:
            raise UpdateRejected(site, f"encrypted update is malformed: {error}") \
                from None
        if update.site != site:
            raise UpdateRejected(site, f"encrypted update is labelled as coming from "
                                 f"site {update.site!r}")
        self.add(update)

    def add(self, update: EncryptedUpdate) -> None:
        """Check one site's encrypted update and add it to the sum.

        Raises UpdateRejected naming the site; a rejected update changes nothing.
        """
        self.commit(self.prepare(update))

    def prepare(self, update: EncryptedUpdate) -> PreparedUpdate:
        """Check and parse an update without adding it; raises UpdateRejected."""
        started = time.perf_counter()
        self._check(update)
        try:
            vectors = parse_ciphertexts(self.key, self.layout, update.ciphertexts)
        except ValueError as error:
            raise UpdateRejected(update.site, str(error)) from None
        self.seconds += time.perf_counter() - started
        return PreparedUpdate(update, vectors)

    def commit(self, prepared: PreparedUpdate) -> None:
        """Add an update returned by :meth:`prepare`; raises UpdateRejected."""
        started = time.perf_counter()
        update, vectors = prepared.update, prepared.vectors
        site = update.site
        self._check(update)
        if not self._sum:
            self._sum = list(vectors)
        else:
            try:
                self._sum = [total + vector
                             for total, vector in zip(self._sum, vectors, strict=True)]
            except ValueError as error:
                raise UpdateRejected(site, f"ciphertexts cannot be added ({error}): "
                                     "they were made with another scale") from None
        if self.base is None:
            self.base = update.base
        self.sites.append(site)
        self.bytes_received += update.num_bytes
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        logger.info("aggregate round %d: added site %s (%d ciphertexts, %d bytes, "
                    "%d sites so far) in %.3f s", self.server_round, site,
                    len(vectors), update.num_bytes, len(self.sites), elapsed)

    def _check(self, update: EncryptedUpdate) -> None:
        site = update.site
        if update.server_round != self.server_round:
            raise UpdateRejected(site, f"encrypted update is for round "
                                 f"{update.server_round}; this is round "
                                 f"{self.server_round}")
        if site in self.sites:
            raise UpdateRejected(site, "second encrypted update in the same round")
        if len(self.sites) >= self.key.params.num_sites:
            raise UpdateRejected(
                site, f"key {self.key.key_id} was made for sums of at most "
                f"{self.key.params.num_sites} sites, so one more would exceed the "
                "headroom of the scale; rotate the key with a larger --sites")
        if update.key_id != self.key.key_id:
            raise UpdateRejected(
                site, f"ciphertexts are under key {update.key_id}, the coordinator "
                f"uses key {self.key.key_id}: give the site the current site "
                "context (from the last `prifed he keygen` or `prifed he rotate`)")
        if update.layout != self.layout.digest:
            raise UpdateRejected(site, f"model layout {update.layout} differs from "
                                 f"the federation's {self.layout.digest}")
        if self.base is not None and update.base != self.base:
            raise UpdateRejected(
                site, f"site trained from global model {update.base}, the other "
                f"sites from {self.base}: its copy of the global model is out of "
                "step (it missed an aggregate)")

    def result(self) -> EncryptedAggregate:
        """Serialise the encrypted sum for the sites; raises if nothing was added."""
        if not self._sum:
            raise ProtocolError(f"aggregate round {self.server_round}: no encrypted "
                                "update was added, so there is nothing to relay")
        started = time.perf_counter()
        ciphertexts = tuple(vector.serialize() for vector in self._sum)
        self.seconds += time.perf_counter() - started
        return EncryptedAggregate(self.server_round, self.key.key_id,
                                  self.layout.digest, self.base or "",
                                  tuple(self.sites), ciphertexts)
