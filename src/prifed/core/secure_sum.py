"""The interface of a private-sum backend: sites encode, the coordinator combines.

A private-sum backend computes, for one round, the sample-weighted sum of the
sites' models and the sum of their sample counts, so that the coordinator
learns these sums and nothing about any single site's update. Secure
aggregation (pairwise masking) and homomorphic encryption (CKKS) both fit
behind it.

A round is message passing between one :class:`Combiner` on the coordinator
and one :class:`SiteEncoder` per site. The combiner issues requests phase by
phase, and each site sends at most one reply to a request. The combiner takes
replies as they arrive. When a phase closes (every site replied or a deadline
passed), the combiner returns the next phase's requests. Sites that did not reply
count as dropped. The same objects run in process for simulation and behind
HTTP handlers in deployment, because a message is plain data:

- a :data:`Message` is a dict with string keys whose values are JSON values
  (None, bool, int, float, str, lists and dicts of them) or ``bytes``;
- every message carries ``"phase"`` (str) and ``"round"`` (int);
- :func:`pack_message` and :func:`unpack_message` turn a message into one
  byte string (a JSON header followed by the raw bytes values) and back.
  Nothing is pickled.

Errors: a combiner raises :class:`MessageRejected` from ``receive`` for a reply
it will not use (it names the site, and the round goes on without that reply),
and :class:`PrivateSumAborted` from ``close_phase`` or ``result`` when the
round cannot finish; the caller then keeps the previous global model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from prifed.core.aggregate import WeightedMean
from prifed.core.messages import TrainInstruction
from prifed.core.params import ParameterSet
from prifed.errors import NotSupportedError, ProtocolError

Message = dict[str, Any]
"""Plain data: JSON values and ``bytes``, with ``"phase"`` and ``"round"`` keys."""

_HEADER = struct.Struct(">I")
_BYTES_TAG = "$bytes"


class MessageRejected(ProtocolError):
    """The combiner will not use one site's reply; the round goes on without it."""

    def __init__(self, site: str, phase: str, reason: str) -> None:
        self.site = site
        self.phase = phase
        self.reason = reason
        super().__init__(f"{phase}: reply from site {site!r} rejected: {reason}")


class PrivateSumAborted(ProtocolError):
    """The round's private sum cannot be completed; keep the previous model."""

    def __init__(self, phase: str, reason: str) -> None:
        self.phase = phase
        self.reason = reason
        super().__init__(f"{phase}: private sum aborted: {reason}; "
                         "the previous global model is kept")


@dataclass(frozen=True)
class PrivateSum:
    """The sums that the coordinator learns from one round, never one site's update.

    ``weighted_sum`` is the sum over contributing sites of ``num_samples``
    times the site's model, tensor by tensor, in float64, so that
    ``weighted_sum / total_weight`` is the FedAvg mean (see
    :meth:`prifed.core.aggregate.WeightedMean.add_sum`). ``max_error`` bounds
    the absolute error of that mean, per value, due to encoding.
    """

    weighted_sum: ParameterSet
    total_weight: float
    sites: tuple[str, ...]
    dropped: dict[str, str] = field(default_factory=dict)
    clipped: int = 0
    max_error: float = 0.0


class SiteEncoder(Protocol):
    """The site side of one round, which keeps the site's update and replies."""

    site: str

    def handle(self, request: Message) -> Message | None:
        """Reply to one coordinator request, or return None to send nothing."""


class Combiner(Protocol):
    """The coordinator side of one round: relays messages and combines the sum."""

    def start(self) -> dict[str, Message]:
        """Return the first phase's request for each site."""

    def receive(self, site: str, reply: Message) -> None:
        """Take one site's reply to the current phase or raise MessageRejected."""

    def close_phase(self) -> dict[str, Message]:
        """Close the current phase and return the next requests, empty when done."""

    def result(self) -> PrivateSum:
        """Return the sums after the last phase closed."""


class PrivateSumBackend(Protocol):
    """A factory of encoders and combiners for one kind of private sum."""

    name: str

    def check(self, num_sites: int, reference: Mapping[str, Any]) -> None:
        """Raise ConfigError at start-up when the backend cannot serve the run."""

    def site_encoder(self, site: str, server_round: int,
                     reference: ParameterSet, update: ParameterSet,
                     num_samples: int) -> SiteEncoder:
        """Return the encoder of one site's update against this round's model."""

    def combiner(self, server_round: int, sites: Sequence[str],
                 reference: ParameterSet) -> Combiner:
        """Return the coordinator side of one round among ``sites``."""


@dataclass
class SecureRound:
    """One training round delivered as a private sum instead of updates.

    ``metrics`` contains each delivering site's training metrics, ``failures``
    the sites that failed or dropped and why. ``private_sum`` is None when the
    round aborted, and ``aborted`` then says why.
    """

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    private_sum: PrivateSum | None = None
    aborted: str = ""


@runtime_checkable
class SecureSumTransport(Protocol):
    """A transport whose sites send a private sum, never a plain update."""

    def site_ids(self) -> list[str]:
        """Return the sites that can take work now."""

    def train_secure(self, server_round: int, params: Mapping[str, np.ndarray],
                     instructions: Sequence[TrainInstruction]) -> SecureRound:
        """Have the sites train, then run one private sum over their updates."""

    def evaluate(self, server_round: int, params: Mapping[str, np.ndarray],
                 sites: Sequence[str]) -> list[Any]:
        """Ask sites to evaluate the global model on their test sets."""


class WrappedSecureTransport:
    """Base of transports that wrap a plain one and deliver rounds as a private sum.

    Site listing and evaluation go to the wrapped transport (evaluation
    metrics are not masked); subclasses implement ``train_secure``.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def site_ids(self) -> list[str]:
        """Return the sites of the wrapped transport."""
        return list(self.inner.site_ids())

    def train(self, server_round: int, params: Mapping[str, np.ndarray],
              instructions: Sequence[TrainInstruction]) -> list[Any]:
        """Raise: this transport delivers a private sum through train_secure."""
        raise NotSupportedError("secure aggregation sends no individual update; "
                                "the round engine calls train_secure instead")

    def evaluate(self, server_round: int, params: Mapping[str, np.ndarray],
                 sites: Sequence[str]) -> list[Any]:
        """Evaluate through the wrapped transport."""
        return list(self.inner.evaluate(server_round, params, sites))


class SumMean:
    """A mean aggregator whose input is a private sum, not replies.

    Strategies that need only the weighted mean (FedAvg, FedProx, server
    optimisers) read it through :meth:`result` as they would from the plain
    aggregator.
    """

    def __init__(self, reference: Mapping[str, np.ndarray],
                 private_sum: PrivateSum) -> None:
        self._mean = WeightedMean(reference)
        self._mean.add_sum(private_sum.weighted_sum, private_sum.total_weight,
                           len(private_sum.sites))

    @property
    def count(self) -> int:
        return self._mean.count

    @property
    def total_weight(self) -> float:
        return self._mean.total_weight

    def add(self, reply: Any) -> None:
        raise NotSupportedError("a private sum takes no individual reply")

    def result(self) -> ParameterSet:
        return self._mean.result()


def pack_message(message: Message) -> bytes:
    """Serialise a message to bytes: header length, JSON header, raw bytes values."""
    blobs: list[bytes] = []
    header = _replace_bytes(message, blobs)
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return b"".join([_HEADER.pack(len(text)), text, *blobs])


def unpack_message(data: bytes) -> Message:
    """Parse bytes from :func:`pack_message`; raise ProtocolError if malformed."""
    try:
        (length,) = _HEADER.unpack_from(data, 0)
        header = json.loads(data[_HEADER.size:_HEADER.size + length])
    except (struct.error, ValueError) as error:
        raise ProtocolError(f"message header is malformed: {error}") from error
    if not isinstance(header, dict):
        raise ProtocolError("message header must be a JSON object; got "
                            f"{type(header).__name__}")
    view = memoryview(data)[_HEADER.size + length:]
    restored = _restore_bytes(header, view)
    assert isinstance(restored, dict)
    return restored


def _replace_bytes(value: Any, blobs: list[bytes]) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        blobs.append(bytes(value))
        return {_BYTES_TAG: [len(blobs) - 1, len(blobs[-1])]}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"message keys must be strings; got {key!r}")
        return {key: _replace_bytes(item, blobs) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_bytes(item, blobs) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError("message values must be JSON values or bytes; got "
                    f"{type(value).__name__}")


def _restore_bytes(value: Any, view: memoryview) -> Any:
    offsets = _blob_offsets(value, [])
    starts = [0]
    for size in offsets:
        starts.append(starts[-1] + size)
    if starts[-1] != len(view):
        raise ProtocolError(f"message body has {len(view)} bytes; its header "
                            f"describes {starts[-1]}")
    return _rebuild(value, view, starts)


def _blob_offsets(value: Any, sizes: list[int]) -> list[int]:
    if isinstance(value, dict):
        if set(value) == {_BYTES_TAG}:
            ref = value[_BYTES_TAG]
            if (not isinstance(ref, list) or len(ref) != 2
                    or ref[0] != len(sizes) or not isinstance(ref[1], int)
                    or ref[1] < 0):
                raise ProtocolError(f"bytes reference is malformed: {ref!r}")
            sizes.append(ref[1])
            return sizes
        for item in value.values():
            _blob_offsets(item, sizes)
    elif isinstance(value, list):
        for item in value:
            _blob_offsets(item, sizes)
    return sizes


def _rebuild(value: Any, view: memoryview, starts: list[int]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_BYTES_TAG}:
            index = value[_BYTES_TAG][0]
            return bytes(view[starts[index]:starts[index + 1]])
        return {key: _rebuild(item, view, starts) for key, item in value.items()}
    if isinstance(value, list):
        return [_rebuild(item, view, starts) for item in value]
    return value


def run_in_process(combiner: Combiner, encoders: Mapping[str, SiteEncoder],
                   wire: bool = True) -> PrivateSum:
    """Run one round between a combiner and site encoders in this process.

    With ``wire`` every message goes through :func:`pack_message` and
    :func:`unpack_message`, as it would over a network. A rejected reply is
    left out of the round, as the combiner decided.
    """
    requests = combiner.start()
    while requests:
        for site, request in requests.items():
            if wire:
                request = unpack_message(pack_message(request))
            reply = encoders[site].handle(request)
            if reply is None:
                continue
            if wire:
                reply = unpack_message(pack_message(reply))
            try:
                combiner.receive(site, reply)
            except MessageRejected:
                continue
        requests = combiner.close_phase()
    return combiner.result()
