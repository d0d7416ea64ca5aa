"""The coordinator side of secure aggregation: relay, check, then unmask the sum.

A :class:`SecAggServer` runs one round among a fixed list of sites. It
relays public keys and encrypted shares and adds each masked vector to a
running sum as it arrives, so no single masked vector is kept. At the end it
rebuilds the self-mask seeds of sites that delivered and the mask keys of
sites that dropped after sharing. That is enough to remove every mask from
the sum.

A site that misses a phase is declared dropped and any later message from it
in this round is rejected. So are duplicate replies, replies for another
phase or round, and malformed replies (wrong-length vectors, missing shares),
each with a :class:`MessageRejected` that names the site. Below the threshold
the round raises :class:`PrivateSumAborted`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from prifed.core.params import ParameterSet, num_values
from prifed.core.secure_sum import (
    Message,
    MessageRejected,
    PrivateSum,
    PrivateSumAborted,
)
from prifed.log import get_logger
from prifed.secagg import crypto, shamir
from prifed.secagg.client import (
    CIPHERTEXT_BYTES,
    PAIRWISE_MASK,
    SESSION_BYTES,
    self_mask_key,
)
from prifed.secagg.config import RoundPlan, SecAggConfig, neighbourhoods
from prifed.secagg.encoding import (
    MAX_BITS,
    add_packed,
    decode_sum,
    packed_size,
    padded_length,
    vector_length,
)
from prifed.secagg.messages import (
    ADVERTISE_KEYS,
    MASKED_INPUT,
    PROTOCOL,
    SHARE_KEYS,
    UNMASK,
    bytes_by_site,
    require_bytes,
    require_dict,
)

logger = get_logger(__name__)

DONE = "done"
ABORTED = "aborted"


class SecAggServer:
    """The coordinator's side of one round of secure aggregation."""

    def __init__(self, server_round: int, sites: Sequence[str],
                 reference: ParameterSet, config: SecAggConfig) -> None:
        if len(set(sites)) != len(sites):
            raise ValueError("sites must be distinct")
        self.server_round = server_round
        self.sites = list(sites)
        self.config = config
        self.plan: RoundPlan = config.plan(len(sites), num_values(reference))
        self.session = os.urandom(SESSION_BYTES)
        self.points = {site: i + 1 for i, site in enumerate(self.sites)}
        self.graph = neighbourhoods(self.sites, self.plan.degree, self.session)
        self.phase = ""
        self.seconds = 0.0
        self.dropped: dict[str, str] = {}
        self.rejected: list[MessageRejected] = []
        self._reference = reference
        self._length = vector_length(reference)
        self._active: set[str] = set(self.sites)
        self._replied: set[str] = set()
        self._failed: dict[str, str] = {}
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._key_owners: dict[bytes, str] = {}
        self._ciphertexts: dict[str, dict[str, bytes]] = {}
        self._invalid: dict[str, set[str]] = {}
        self._delivered: set[str] = set()
        self._total = np.zeros(padded_length(self._length), dtype=np.uint64)
        self._requests: dict[str, tuple[list[str], list[str]]] = {}
        self._seed_shares: dict[str, dict[int, bytes]] = {}
        self._key_shares: dict[str, dict[int, bytes]] = {}
        self._lost: list[str] = []
        self._result: PrivateSum | None = None

    # The public methods follow the Combiner interface of prifed.core.secure_sum.

    def start(self) -> dict[str, Message]:
        """Return the advertise-keys request of every site."""
        started = time.perf_counter()
        self.phase = ADVERTISE_KEYS
        encoding = self.config.encoding
        requests = {}
        for site in self.sites:
            requests[site] = self._request({
                "protocol": PROTOCOL, "session": self.session,
                "index": self.points[site],
                "neighbours": {peer: self.points[peer] for peer in self.graph[site]},
                "threshold": self.plan.threshold, "bits": self.plan.bits,
                "num_sites": self.plan.num_sites, "clip": encoding.clip,
                "precision_bits": encoding.precision_bits,
                "max_samples": encoding.max_samples, "vector_length": self._length})
        logger.info("secagg round %d: start with %d sites, %s, %d neighbours, "
                    "threshold %d, %d-bit modulus, %d values", self.server_round,
                    len(self.sites), self.config.mode, self.plan.degree,
                    self.plan.threshold, self.plan.bits, self._length)
        self.seconds += time.perf_counter() - started
        return requests

    def receive(self, site: str, reply: Message) -> None:
        """Check one reply of the current phase and keep what the protocol needs."""
        started = time.perf_counter()
        try:
            self._admit(site, reply)
            try:
                {ADVERTISE_KEYS: self._take_keys, SHARE_KEYS: self._take_shares,
                 MASKED_INPUT: self._take_masked, UNMASK: self._take_reveal
                 }[self.phase](site, reply)
            except (ValueError, shamir.ShareError) as error:
                self._failed[site] = f"malformed reply: {error}"
                raise self._rejection(site, f"malformed reply: {error}") from None
            self._replied.add(site)
        finally:
            self.seconds += time.perf_counter() - started

    def close_phase(self) -> dict[str, Message]:
        """Close the current phase; return the next requests, empty when done."""
        started = time.perf_counter()
        try:
            closing = {ADVERTISE_KEYS: self._close_advertise,
                       SHARE_KEYS: self._close_share, MASKED_INPUT: self._close_masked,
                       UNMASK: self._close_unmask}
            if self.phase not in closing:
                raise PrivateSumAborted(self.phase or "start",
                                        "no phase is open to close")
            return closing[self.phase]()
        finally:
            self.seconds += time.perf_counter() - started

    def result(self) -> PrivateSum:
        """Return the sums after the unmask phase closed."""
        if self._result is None:
            raise PrivateSumAborted(self.phase or "start",
                                    "the round has not completed")
        return self._result

    def _admit(self, site: str, reply: Message) -> None:
        if self.phase in (DONE, ABORTED, ""):
            state = self.phase or "not started"
            raise self._rejection(site, f"the round is not open ({state})")
        if site not in self.points:
            raise self._rejection(site, "site is not part of this round")
        if site in self.dropped:
            raise self._rejection(site, "site was declared dropped "
                                  f"({self.dropped[site]}) and is refused for the "
                                  "rest of this round")
        if site in self._failed:
            raise self._rejection(site, "an earlier reply of this site in this phase "
                                  f"was rejected ({self._failed[site]})")
        if not isinstance(reply, dict):
            raise self._rejection(site, "reply must be an object")
        if reply.get("round") != self.server_round:
            raise self._rejection(site, f"reply is for round {reply.get('round')!r}, "
                                  f"not {self.server_round}")
        if reply.get("phase") != self.phase:
            raise self._rejection(site, f"reply is for phase {reply.get('phase')!r} "
                                  f"but the round is in phase {self.phase!r}")
        if site in self._replied:
            raise self._rejection(site, f"second reply in phase {self.phase}; the "
                                  "first reply is kept")

    def _rejection(self, site: str, reason: str) -> MessageRejected:
        error = MessageRejected(site, self.phase or "start", reason)
        self.rejected.append(error)
        logger.warning("secagg round %d: %s", self.server_round, error)
        return error

    def _take_keys(self, site: str, reply: Message) -> None:
        channel = require_bytes(reply, "c_pk", crypto.KEY_BYTES)
        masking = require_bytes(reply, "s_pk", crypto.KEY_BYTES)
        probe = X25519PrivateKey.generate()
        for key in (channel, masking):
            crypto.pair_key(probe, key, "check", self.session, 0, site, site)
        for key in (channel, masking):
            if key in self._key_owners:
                raise ValueError("public key already advertised by site "
                                 f"{self._key_owners[key]!r}")
        if channel == masking:
            raise ValueError("the two public keys must differ")
        self._keys[site] = (channel, masking)
        self._key_owners[channel] = site
        self._key_owners[masking] = site

    def _take_shares(self, site: str, reply: Message) -> None:
        ciphertexts = bytes_by_site(reply, "ciphertexts", CIPHERTEXT_BYTES)
        expected = set(self._neighbours(site))
        missing = sorted(expected - set(ciphertexts))
        if missing:
            raise ValueError(f"no share for neighbour {missing[0]!r}")
        extra = sorted(set(ciphertexts) - expected)
        if extra:
            raise ValueError(f"share for {extra[0]!r}, which is not a neighbour "
                             "still in the round")
        self._ciphertexts[site] = ciphertexts

    def _take_masked(self, site: str, reply: Message) -> None:
        masked = require_bytes(reply, "masked")
        size = packed_size(self._length, self.plan.bits)
        if len(masked) != size:
            raise ValueError(f"masked vector must be {size} bytes ({self._length} "
                             f"values of {self.plan.bits} bits); got {len(masked)}")
        invalid = require_dict(reply, "invalid_shares")
        senders = set(self._neighbours(site))
        for sender, reason in invalid.items():
            if sender not in senders or not isinstance(reason, str):
                raise ValueError(f"invalid_shares names {sender!r}, which sent this "
                                 "site no share")
        add_packed(self._total, masked, self.plan.bits)
        self._delivered.add(site)
        for sender, reason in invalid.items():
            self._invalid.setdefault(sender, set()).add(site)
            logger.warning("secagg round %d: site %s reports the share from site "
                           "%s as invalid: %s", self.server_round, site, sender,
                           reason[:200])

    def _take_reveal(self, site: str, reply: Message) -> None:
        survivors, dropped = self._requests[site]
        seeds = bytes_by_site(reply, "seed_shares", shamir.SHARE_BYTES)
        keys = bytes_by_site(reply, "key_shares", shamir.SHARE_BYTES)
        expected_seeds = {owner for owner in survivors
                          if owner == site or site not in self._invalid.get(owner, ())}
        expected_keys = {owner for owner in dropped
                         if site not in self._invalid.get(owner, ())}
        if set(seeds) != expected_seeds:
            raise ValueError("seed_shares must cover exactly the delivered neighbours "
                             "this site holds shares of")
        if set(keys) != expected_keys:
            raise ValueError("key_shares must cover exactly the dropped neighbours "
                             "this site holds shares of")
        for share in [*seeds.values(), *keys.values()]:
            shamir.share_value(share)
        point = self.points[site]
        for owner, share in seeds.items():
            self._seed_shares.setdefault(owner, {})[point] = share
        for owner, share in keys.items():
            self._key_shares.setdefault(owner, {})[point] = share

    def _neighbours(self, site: str) -> list[str]:
        return [peer for peer in self.graph[site] if peer in self._active]

    def _close_advertise(self) -> dict[str, Message]:
        self._end_phase("sent no public keys")
        self._prune("too few share holders remain to share its keys")
        self.phase = SHARE_KEYS
        requests = {}
        for site in self._ordered(self._active):
            keys = {peer: {"c_pk": self._keys[peer][0], "s_pk": self._keys[peer][1]}
                    for peer in self._neighbours(site)}
            requests[site] = self._request({"keys": keys})
        return requests

    def _close_share(self) -> dict[str, Message]:
        self._end_phase("sent no shares")
        self._prune("too few share holders remain to rebuild its secrets")
        self.phase = MASKED_INPUT
        requests = {}
        for site in self._ordered(self._active):
            relayed = {peer: self._ciphertexts[peer][site]
                       for peer in self._neighbours(site)}
            requests[site] = self._request({"ciphertexts": relayed})
        self._ciphertexts.clear()
        return requests

    def _close_masked(self) -> dict[str, Message]:
        sharing = set(self._active)
        self._end_phase("sent no masked input; its masks are removed with its "
                        "key shares")
        self._lost = self._ordered(sharing - self._active)
        self._check_recoverable()
        self.phase = UNMASK
        requests = {}
        for site in self._ordered(self._active):
            near = [peer for peer in self.graph[site] if peer in sharing]
            survivors = [site] + [peer for peer in near if peer in self._active]
            dropped = [peer for peer in near if peer not in self._active]
            self._requests[site] = (survivors, dropped)
            requests[site] = self._request({"survivors": survivors,
                                            "dropped": dropped})
        return requests

    def _check_recoverable(self) -> None:
        """Abort before any share is revealed when some secret cannot be rebuilt."""
        for site in self._ordered(self._active):
            holders = [peer for peer in [site, *self.graph[site]]
                       if peer in self._active
                       and (peer == site or peer not in self._invalid.get(site, ()))]
            self._need(len(holders), f"seed shares of site {site!r}")
        for site in self._lost:
            holders = [peer for peer in self.graph[site] if peer in self._active
                       and peer not in self._invalid.get(site, ())]
            self._need(len(holders), f"mask-key shares of site {site!r}")

    def _close_unmask(self) -> dict[str, Message]:
        for site in self._ordered(self._active - self._replied):
            reason = self._failed.get(site, "sent no unmask reply")
            self.dropped[site] = f"{self.phase}: {reason}"
            logger.warning("secagg round %d: site %s %s after delivering its masked "
                           "input; its update stays in the sum", self.server_round,
                           site, reason)
        total = self._total[:self._length]
        masks = crypto.MaskGenerator(self._length)
        for site in self._ordered(self._delivered):
            seed = self._rebuild(self._seed_shares.get(site, {}),
                                 f"self-mask seed of site {site!r}")
            total -= masks.expand(self_mask_key(seed, self.session, self.server_round,
                                                site))
        for site in self._lost:
            raw = self._rebuild(self._key_shares.get(site, {}),
                                f"mask key of site {site!r}")
            if crypto.public_of(raw) != self._keys[site][1]:
                self._abort(f"the shares of site {site!r} rebuild a mask key that "
                            "does not match its public key, so a share is wrong")
            private = crypto.load_private(raw)
            for peer in self.graph[site]:
                if peer not in self._delivered:
                    continue
                key = crypto.pair_key(private, self._keys[peer][1], PAIRWISE_MASK,
                                      self.session, self.server_round, site, peer)
                if self.points[peer] < self.points[site]:
                    total -= masks.expand(key)
                else:
                    total += masks.expand(key)
        self._result = self._finish(total)
        self.phase = DONE
        return {}

    def _finish(self, total: np.ndarray) -> PrivateSum:
        encoding = self.config.encoding
        bits = self.plan.bits
        if bits < MAX_BITS:
            total &= np.uint64(2**bits - 1)
        deltas, weight, clipped = decode_sum(total, bits, self._reference, encoding)
        weighted_sum = {name: deltas[name] + weight * np.asarray(
            self._reference[name], dtype=np.float64) for name in self._reference}
        contributors = tuple(self._ordered(self._delivered))
        dropped = {site: reason for site, reason in self.dropped.items()
                   if site not in self._delivered}
        if clipped:
            logger.warning("secagg round %d: %d values were clipped at %g across "
                           "sites; raise clip if this repeats", self.server_round,
                           clipped, encoding.clip)
        logger.info("secagg round %d: sum of %d sites unmasked, %d dropped, total "
                    "weight %d", self.server_round, len(contributors), len(dropped),
                    weight)
        self._seed_shares.clear()
        self._key_shares.clear()
        return PrivateSum(weighted_sum, float(weight), contributors, dropped, clipped,
                          encoding.max_error(len(contributors), weight))

    def _rebuild(self, shares: dict[int, bytes], description: str) -> bytes:
        self._need(len(shares), description)
        try:
            return shamir.combine(shares, self.plan.threshold, crypto.KEY_BYTES)
        except shamir.ShareError as error:
            self._abort(f"{description} cannot be rebuilt: {error}")
            raise

    def _need(self, available: int, description: str) -> None:
        if available < self.plan.threshold:
            self._abort(f"{available} sites can reveal the {description}, fewer "
                        f"than the threshold {self.plan.threshold}")

    def _end_phase(self, reason: str) -> None:
        for site in self._ordered(self._active - self._replied):
            detail = self._failed.get(site, reason)
            self.dropped[site] = f"{self.phase}: {detail}"
            logger.warning("secagg round %d: site %s dropped in %s: %s",
                           self.server_round, site, self.phase, detail)
        self._active &= self._replied
        self._replied = set()
        self._failed = {}
        self._check_size()

    def _prune(self, reason: str) -> None:
        # Dropping one site can leave a neighbour short of holders in turn.
        changed = True
        while changed:
            changed = False
            for site in self._ordered(self._active):
                holders = len(self._neighbours(site)) + 1
                if holders < self.plan.threshold:
                    self._active.discard(site)
                    self.dropped[site] = f"{self.phase}: {reason} ({holders})"
                    logger.warning("secagg round %d: site %s dropped in %s: %s",
                                   self.server_round, site, self.phase, reason)
                    changed = True
        self._check_size()

    def _check_size(self) -> None:
        if len(self._active) < self.plan.threshold:
            self._abort(f"{len(self._active)} of {len(self.sites)} sites remain, "
                        f"fewer than the threshold {self.plan.threshold}")

    def _abort(self, reason: str) -> None:
        phase = self.phase
        self.phase = ABORTED
        self._total = np.zeros(0, dtype=np.uint64)
        self._seed_shares.clear()
        self._key_shares.clear()
        error = PrivateSumAborted(phase, f"round {self.server_round}: {reason}")
        logger.error("secagg round %d: %s", self.server_round, error)
        raise error

    def _request(self, body: dict[str, Any]) -> Message:
        return {"phase": self.phase, "round": self.server_round, **body}

    def _ordered(self, sites: set[str]) -> list[str]:
        return sorted(sites, key=self.points.__getitem__)

