"""The site side of secure aggregation: a state machine over the four phases.

A :class:`SecAggClient` is made for one round with the site's update and
sample count, and replies to the coordinator's requests in phase order. It
checks the round's public parameters itself (the modulus must fit the
number of sites, the threshold must be at least 2), so a misconfigured
coordinator cannot make its sum wrap. It never reveals both shares of one
site, and it reveals anything only once per round.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from prifed.core.params import ParameterSet, validate_update
from prifed.core.secure_sum import Message
from prifed.errors import ProtocolError, UpdateRejected
from prifed.log import get_logger
from prifed.secagg import crypto, shamir
from prifed.secagg.encoding import (
    MAX_BITS,
    TRAILER,
    FixedPoint,
    encode,
    pack_bits,
    vector_length,
)
from prifed.secagg.messages import (
    ADVERTISE_KEYS,
    MASKED_INPUT,
    PHASES,
    PROTOCOL,
    SHARE_KEYS,
    UNMASK,
    bytes_by_site,
    require_bytes,
    require_dict,
    require_float,
    require_int,
    require_names,
)

logger = get_logger(__name__)

SESSION_BYTES = 16
SHARE_PLAINTEXT = struct.Struct(f">I{shamir.SHARE_BYTES}s{shamir.SHARE_BYTES}s")
"""A share message between sites: recipient point, mask-key share, seed share."""

CIPHERTEXT_BYTES = crypto.NONCE_BYTES + SHARE_PLAINTEXT.size + 16

SHARE_CHANNEL = "share channel"
PAIRWISE_MASK = "pairwise mask"
SELF_MASK = "self mask"


def self_mask_key(seed: bytes, session: bytes, server_round: int, site: str) -> bytes:
    """Derive the AES key of a site's self mask from its seed."""
    return crypto.derive(seed, session, json.dumps([SELF_MASK, server_round, site]))


@dataclass(frozen=True)
class RoundParameters:
    """The public parameters of a round as one site received them."""

    session: bytes
    index: int
    neighbours: dict[str, int]
    threshold: int
    bits: int
    num_sites: int
    encoding: FixedPoint


class SecAggClient:
    """One site's side of one round of secure aggregation."""

    def __init__(self, site: str, server_round: int, reference: ParameterSet,
                 update: ParameterSet, num_samples: int) -> None:
        validate_update(site, reference, update)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) \
                or num_samples < 0:
            raise UpdateRejected(site, "num_samples must be an integer >= 0; got "
                                 f"{num_samples!r}")
        self.site = site
        self.server_round = server_round
        self.seconds = 0.0
        self._reference = reference
        self._update: ParameterSet | None = update
        self._num_samples = num_samples
        self._next = 0
        self._params: RoundParameters | None = None
        self._peers: dict[str, tuple[bytes, bytes]] = {}
        self._held: dict[str, tuple[bytes, bytes]] = {}
        self._own_shares: tuple[bytes, bytes] = (b"", b"")
        self._partners: set[str] = set()
        self._last: tuple[Message, Message] | None = None

    def handle(self, request: Message) -> Message:
        """Reply to the coordinator's request for the next phase.

        Raises ProtocolError naming this site for a request out of order, for
        another round, malformed, or one that would weaken the protocol.
        """
        started = time.perf_counter()
        phase = request.get("phase")
        # A repeated request (a retry over the network) gets the same reply,
        # so no secret is drawn or revealed twice.
        if self._last is not None and request == self._last[0]:
            return dict(self._last[1])
        if self._next >= len(PHASES):
            raise ProtocolError(f"site {self.site!r}: round {self.server_round} is "
                                f"finished; request for phase {phase!r} rejected")
        expected = PHASES[self._next]
        if phase != expected or request.get("round") != self.server_round:
            raise ProtocolError(
                f"site {self.site!r}: expected phase {expected!r} of round "
                f"{self.server_round}; got phase {phase!r} of round "
                f"{request.get('round')!r}")
        handlers = {ADVERTISE_KEYS: self._advertise, SHARE_KEYS: self._share,
                    MASKED_INPUT: self._mask, UNMASK: self._unmask}
        # A failed request ends this site's round: nothing is retried.
        self._next = len(PHASES)
        try:
            body = handlers[expected](request)
        except ValueError as error:
            raise ProtocolError(f"site {self.site!r}, phase {expected}: "
                                f"{error}") from None
        self._next = PHASES.index(expected) + 1
        self.seconds += time.perf_counter() - started
        reply = {"phase": expected, "round": self.server_round, **body}
        self._last = (dict(request), reply)
        return dict(reply)

    def _advertise(self, request: Message) -> dict[str, Any]:
        if request.get("protocol") != PROTOCOL:
            raise ValueError(f"protocol must be {PROTOCOL!r}; got "
                             f"{request.get('protocol')!r}")
        params = self._check_parameters(request)
        self._params = params
        self._channel_key, channel_public = crypto.generate_key_pair()
        self._mask_key, mask_public = crypto.generate_key_pair()
        logger.debug("secagg round %d: site %s advertises keys, %d neighbours, "
                     "threshold %d", self.server_round, self.site,
                     len(params.neighbours), params.threshold)
        return {"c_pk": channel_public, "s_pk": mask_public}

    def _check_parameters(self, request: Message) -> RoundParameters:
        session = require_bytes(request, "session", SESSION_BYTES)
        index = require_int(request, "index")
        neighbours = require_dict(request, "neighbours")
        threshold = require_int(request, "threshold")
        bits = require_int(request, "bits")
        num_sites = require_int(request, "num_sites")
        encoding = FixedPoint(require_float(request, "clip"),
                              require_int(request, "precision_bits"),
                              require_int(request, "max_samples"))
        length = require_int(request, "vector_length")

        points = list(neighbours.values())
        if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1
                   for p in points) or len(set(points + [index])) != len(points) + 1:
            raise ValueError("neighbour points must be distinct positive integers "
                             "different from this site's point")
        if self.site in neighbours or index < 1 or num_sites < len(neighbours) + 1:
            raise ValueError("neighbours must exclude this site and fit num_sites")

        if not 2 <= threshold <= len(neighbours) + 1:
            raise ValueError(f"threshold must be between 2 and {len(neighbours) + 1} "
                             f"share holders; got {threshold}")
        own_length = vector_length(self._reference)
        if length != own_length:
            raise ValueError(f"vector_length must be {own_length} for this site's "
                             f"model; got {length}")
        needed = encoding.modulus_bits(num_sites, own_length - TRAILER)
        if not needed <= bits <= MAX_BITS:
            raise ValueError(f"bits must be between {needed} and {MAX_BITS} so that "
                             f"a sum over {num_sites} sites cannot wrap; got {bits}")
        return RoundParameters(session, index, dict(neighbours), threshold, bits,
                               num_sites, encoding)

    def _share(self, request: Message) -> dict[str, Any]:
        params = self._require_params()
        keys = require_dict(request, "keys")
        for peer, entry in keys.items():
            if peer not in params.neighbours:
                raise ValueError(f"key of {peer!r}, which is not a neighbour")
            if not isinstance(entry, dict):
                raise ValueError(f"keys of {peer!r} must be an object")
            self._peers[peer] = (require_bytes(entry, "c_pk", crypto.KEY_BYTES),
                                 require_bytes(entry, "s_pk", crypto.KEY_BYTES))
        if len(keys) + 1 < params.threshold:
            raise ValueError(f"{len(keys) + 1} share holders remain, fewer than the "
                             f"threshold {params.threshold}")

        self._seed = os.urandom(crypto.KEY_BYTES)
        points = [params.index] + [params.neighbours[peer] for peer in keys]
        key_shares = shamir.split(crypto.private_bytes(self._mask_key),
                                  params.threshold, points)
        seed_shares = shamir.split(self._seed, params.threshold, points)
        self._own_shares = (key_shares[params.index], seed_shares[params.index])

        ciphertexts = {}
        for peer in keys:
            point = params.neighbours[peer]
            plaintext = SHARE_PLAINTEXT.pack(point, key_shares[point],
                                             seed_shares[point])
            context = crypto.share_context(params.session, self.server_round,
                                           self.site, peer)
            ciphertexts[peer] = crypto.seal(self._channel(peer), plaintext, context)
        return {"ciphertexts": ciphertexts}

    def _channel(self, peer: str) -> bytes:
        params = self._require_params()
        try:
            return crypto.pair_key(self._channel_key, self._peers[peer][0],
                                   SHARE_CHANNEL, params.session, self.server_round,
                                   self.site, peer)
        except ValueError:
            raise ValueError(f"public key of {peer!r} is invalid") from None

    def _mask(self, request: Message) -> dict[str, Any]:
        params = self._require_params()
        ciphertexts = bytes_by_site(request, "ciphertexts")
        unknown = sorted(set(ciphertexts) - set(self._peers))
        if unknown:
            raise ValueError(f"ciphertext from {unknown[0]!r}, which sent no keys")
        if len(ciphertexts) + 1 < params.threshold:
            raise ValueError(f"{len(ciphertexts) + 1} share holders remain, fewer "
                             f"than the threshold {params.threshold}")
        invalid = {}
        for peer, sealed in ciphertexts.items():
            try:
                self._held[peer] = self._open_share(peer, sealed)
            except ValueError as error:
                invalid[peer] = str(error)
                logger.warning("secagg round %d: site %s rejects the share from "
                               "site %s: %s", self.server_round, self.site, peer, error)
        self._partners = set(ciphertexts)
        masked = self._masked_vector()
        return {"masked": masked, "invalid_shares": invalid}

    def _open_share(self, peer: str, sealed: bytes) -> tuple[bytes, bytes]:
        params = self._require_params()
        context = crypto.share_context(params.session, self.server_round, peer,
                                       self.site)
        plaintext = crypto.open_sealed(self._channel(peer), sealed, context)
        if len(plaintext) != SHARE_PLAINTEXT.size:
            raise ValueError(f"share must be {SHARE_PLAINTEXT.size} bytes; got "
                             f"{len(plaintext)}")
        point, key_share, seed_share = SHARE_PLAINTEXT.unpack(plaintext)
        if point != params.index:
            raise ValueError(f"share is for point {point}; this site's point is "
                             f"{params.index}")
        shamir.share_value(key_share)
        shamir.share_value(seed_share)
        return key_share, seed_share

    def _masked_vector(self) -> bytes:
        params = self._require_params()
        assert self._update is not None
        encoded = encode(self._update, self._reference, self._num_samples,
                         params.encoding)
        if encoded.clipped:
            logger.warning("secagg round %d: site %s clipped %d values at %g",
                           self.server_round, self.site, encoded.clipped,
                           params.encoding.clip)
        vector = encoded.vector
        masks = crypto.MaskGenerator(vector.size)
        vector += masks.expand(self_mask_key(self._seed, params.session,
                                             self.server_round, self.site))
        for peer in sorted(self._partners):
            key = crypto.pair_key(self._mask_key, self._peers[peer][1], PAIRWISE_MASK,
                                  params.session, self.server_round, self.site, peer)
            # The site with the lower point adds the pair's mask, the other
            # subtracts it, so the two cancel in the sum.
            if params.index < params.neighbours[peer]:
                vector += masks.expand(key)
            else:
                vector -= masks.expand(key)
        if params.bits < MAX_BITS:
            vector &= np.uint64(2**params.bits - 1)
        # The plain update is no longer needed; drop it before anything else.
        self._update = None
        return pack_bits(vector, params.bits)

    def _unmask(self, request: Message) -> dict[str, Any]:
        params = self._require_params()
        survivors = require_names(request, "survivors")
        dropped = require_names(request, "dropped")
        both = sorted(set(survivors) & set(dropped))
        if both:
            raise ValueError(f"site {both[0]!r} is listed as delivered and dropped; "
                             "revealing both of its shares would expose its update")
        if self.site not in survivors:
            raise ValueError("this site is missing from the survivors")
        if set(survivors) | set(dropped) != self._partners | {self.site}:
            raise ValueError("survivors and dropped must cover exactly the sites "
                             "this site masked with")
        if len(survivors) < params.threshold:
            raise ValueError(f"{len(survivors)} sites delivered masked input, fewer "
                             f"than the threshold {params.threshold}")
        seed_shares = {peer: self._held[peer][1] for peer in survivors
                       if peer in self._held}
        seed_shares[self.site] = self._own_shares[1]
        key_shares = {peer: self._held[peer][0] for peer in dropped
                      if peer in self._held}
        logger.debug("secagg round %d: site %s reveals %d seed shares and %d key "
                     "shares", self.server_round, self.site, len(seed_shares),
                     len(key_shares))
        self._held.clear()
        return {"seed_shares": seed_shares, "key_shares": key_shares}

    def _require_params(self) -> RoundParameters:
        if self._params is None:
            raise ValueError("round parameters were never received")
        return self._params

