"""CKKS behind the private-sum interface of :mod:`prifed.core.secure_sum`.

The round is one phase: the combiner asks every site for its ciphertexts and
adds the replies. Where secure aggregation ends with the sum in the clear,
CKKS ends with the sum still encrypted, because the coordinator holds no
secret key. So :meth:`CKKSCombiner.result` raises NotSupportedError and
:meth:`CKKSCombiner.sealed_result` returns the encrypted aggregate, which the
coordinator relays to the sites; each site decrypts it and steps its own copy
of the global model (see :class:`prifed.he.site.HESite`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from prifed.core.params import ParameterSet
from prifed.core.secure_sum import Message, MessageRejected, PrivateSum
from prifed.errors import ConfigError, NotSupportedError, UpdateRejected
from prifed.he.combine import EncryptedSum
from prifed.he.keys import FederationKey
from prifed.he.packing import EncryptedAggregate, EncryptedUpdate, Layout, model_digest
from prifed.he.site import encrypt_update

REQUEST_PHASE = "ckks-encrypt"
REPLY_PHASE = "ckks-ciphertexts"


def update_to_message(update: EncryptedUpdate) -> Message:
    """Return an encrypted update as a private-sum message."""
    return {"phase": REPLY_PHASE, "round": update.server_round, "site": update.site,
            "key_id": update.key_id, "layout": update.layout, "base": update.base,
            "ciphertexts": list(update.ciphertexts)}


def update_from_message(message: Message) -> EncryptedUpdate:
    """Parse a private-sum message into an encrypted update; raises ValueError."""
    if message.get("phase") != REPLY_PHASE:
        raise ValueError(f"phase must be {REPLY_PHASE!r}; got "
                         f"{message.get('phase')!r}")
    fields: dict[str, Any] = {}
    for name in ("site", "key_id", "layout", "base"):
        if not isinstance(message.get(name), str):
            raise ValueError(f"field {name!r} must be a string")
        fields[name] = message[name]
    ciphertexts = message.get("ciphertexts")
    if not isinstance(ciphertexts, list) or \
            not all(isinstance(c, bytes) for c in ciphertexts):
        raise ValueError("field 'ciphertexts' must be a list of bytes")
    server_round = message.get("round")
    if not isinstance(server_round, int):
        raise ValueError("field 'round' must be an integer")
    return EncryptedUpdate(fields["site"], server_round, fields["key_id"],
                           fields["layout"], fields["base"], tuple(ciphertexts))


class CKKSSiteEncoder:
    """One site's side of a CKKS round: encrypt ``weight * (update - reference)``."""

    def __init__(self, key: FederationKey, site: str, server_round: int,
                 reference: ParameterSet, update: ParameterSet,
                 num_samples: int) -> None:
        self.key = key
        self.site = site
        self.server_round = server_round
        self.layout = Layout.of(reference, key.params.slots)
        self.base = model_digest(reference)
        self.delta = {name: np.asarray(update[name], np.float64)
                      - np.asarray(reference[name], np.float64) for name in reference}
        self.num_samples = num_samples
        self.clipped = 0

    def handle(self, request: Message) -> Message | None:
        """Reply to the combiner's request with this site's ciphertexts."""
        if request.get("phase") != REQUEST_PHASE or \
                request.get("round") != self.server_round:
            return None
        encrypted, report = encrypt_update(
            self.key, self.layout, self.site, self.server_round, self.delta,
            float(self.num_samples), self.base)
        self.clipped = report.clipped
        return update_to_message(encrypted)


class CKKSCombiner:
    """The coordinator's side of a CKKS round; its result stays encrypted."""

    def __init__(self, key: FederationKey, server_round: int, sites: Sequence[str],
                 reference: ParameterSet) -> None:
        self.sites = list(sites)
        self.server_round = server_round
        layout = Layout.of(reference, key.params.slots)
        self._sum = EncryptedSum(key, layout, server_round)
        self.dropped: dict[str, str] = {}
        self._closed = False

    def start(self) -> dict[str, Message]:
        """Ask every site of the round for its ciphertexts."""
        request = {"phase": REQUEST_PHASE, "round": self.server_round,
                   "key_id": self._sum.key.key_id}
        return {site: dict(request) for site in self.sites}

    def receive(self, site: str, reply: Message) -> None:
        """Add one site's ciphertexts, or raise MessageRejected naming the site."""
        try:
            self._add(site, reply)
        except (ValueError, UpdateRejected) as error:
            reason = error.reason if isinstance(error, UpdateRejected) else str(error)
            self.dropped[site] = reason
            raise MessageRejected(site, REPLY_PHASE, reason) from None

    def _add(self, site: str, reply: Message) -> None:
        if site not in self.sites:
            raise ValueError("site is not part of this round")
        update = update_from_message(reply)
        if update.site != site:
            raise ValueError(f"reply is labelled as coming from site {update.site!r}")
        self._sum.add(update)

    def close_phase(self) -> dict[str, Message]:
        """Close the only phase; sites that did not reply count as dropped."""
        for site in self.sites:
            if site not in self._sum.sites and site not in self.dropped:
                self.dropped[site] = "no reply"
        self._closed = True
        return {}

    def result(self) -> PrivateSum:
        """Refuse: the coordinator cannot decrypt a CKKS sum."""
        raise NotSupportedError(
            "a CKKS sum stays encrypted, so the coordinator cannot return it in "
            "the clear; relay sealed_result() to the sites, which decrypt it")

    def sealed_result(self) -> EncryptedAggregate:
        """Return the encrypted aggregate to relay to every site."""
        if not self._closed:
            raise ConfigError("close the phase before taking the result")
        return self._sum.result()


class CKKSBackend:
    """Factory of CKKS encoders (sites) and combiners (coordinator) for one key.

    A site's backend has the site context and only makes encoders. The
    coordinator's has the coordinator context and only makes combiners.
    """

    name = "ckks"

    def __init__(self, key: FederationKey) -> None:
        self.key = key

    def check(self, num_sites: int, reference: Mapping[str, Any]) -> None:
        """Raise ConfigError when the key's parameters cannot serve the run."""
        if num_sites > self.key.params.num_sites:
            raise ConfigError(
                f"the run has {num_sites} sites but key {self.key.key_id} was made "
                f"for sums of at most {self.key.params.num_sites}; create a key "
                f"with `prifed he keygen --sites {num_sites}`")

    def site_encoder(self, site: str, server_round: int, reference: ParameterSet,
                     update: ParameterSet, num_samples: int) -> CKKSSiteEncoder:
        """Return the encoder of one site's update against this round's model."""
        return CKKSSiteEncoder(self.key, site, server_round, reference, update,
                               num_samples)

    def combiner(self, server_round: int, sites: Sequence[str],
                 reference: ParameterSet) -> CKKSCombiner:
        """Return the coordinator side of one round; ``reference`` gives the layout."""
        return CKKSCombiner(self.key, server_round, sites, reference)

