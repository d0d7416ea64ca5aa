"""Packing of updates into CKKS slots and the wire form of encrypted messages.

A site's update becomes one float64 vector. Slot 0 is the site's weight and
slot 1 is 1.0, so the sum counts its contributions (a check after
decryption). The weighted values of every tensor follow in model order.
The vector is cut into as many ciphertexts as the slots per ciphertext need.

On the wire an encrypted update or aggregate is a parameter set of uint8
tensors, so the transport that carries plain updates carries it too:
``he.header`` holds a JSON header and ``he.ct.00000`` onward hold each
ciphertext in TenSEAL's own serialisation. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from prifed.core.params import ParameterSet

WEIGHT_SLOT = 0
COUNT_SLOT = 1
HEADER_SLOTS = 2

HEADER_TENSOR = "he.header"
CIPHERTEXT_PREFIX = "he.ct."
UPDATE_FORMAT = "prifed-ckks-update"
AGGREGATE_FORMAT = "prifed-ckks-aggregate"
WIRE_VERSION = 1


@dataclass(frozen=True)
class Layout:
    """Position of each tensor of a model in the slots of a site's ciphertexts."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    slots: int

    @classmethod
    def of(cls, params: Mapping[str, np.ndarray], slots: int) -> Layout:
        """Describe a parameter set packed into ciphertexts of ``slots`` values."""
        return cls(tuple(params), tuple(tuple(v.shape) for v in params.values()),
                   tuple(v.dtype.str for v in params.values()), slots)

    @property
    def num_values(self) -> int:
        return int(sum(math.prod(shape) for shape in self.shapes))

    @property
    def num_ciphertexts(self) -> int:
        return math.ceil((self.num_values + HEADER_SLOTS) / self.slots)

    def chunk_sizes(self) -> list[int]:
        """Return the number of slots used in each ciphertext."""
        total = self.num_values + HEADER_SLOTS
        sizes = [self.slots] * (total // self.slots)
        if total % self.slots:
            sizes.append(total % self.slots)
        return sizes

    @property
    def digest(self) -> str:
        """A short hash of names, shapes, dtypes and slots, to detect mismatches."""
        text = json.dumps([self.names, self.shapes, self.dtypes, self.slots])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def flatten(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate the tensors in layout order into one float64 vector."""
        return np.concatenate([np.asarray(params[name], dtype=np.float64).ravel()
                               for name in self.names] or [np.zeros(0)])

    def unflatten(self, values: np.ndarray) -> ParameterSet:
        """Cut a float64 vector back into tensors of the layout's shapes."""
        if values.size != self.num_values:
            raise ValueError(f"vector must have {self.num_values} values; "
                             f"got {values.size}")
        out: ParameterSet = {}
        start = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            out[name] = values[start:start + size].reshape(shape)
            start += size
        return out

    def split(self, slots: np.ndarray) -> list[np.ndarray]:
        """Cut a slot vector (header slots first) into one piece per ciphertext."""
        pieces = []
        start = 0
        for size in self.chunk_sizes():
            pieces.append(slots[start:start + size])
            start += size
        return pieces


def model_digest(params: Mapping[str, np.ndarray]) -> str:
    """Hash a model's names, dtypes, shapes and bytes into 16 hex characters.

    Sites send this digest of the global model they trained from, so the
    coordinator can check that every site has the same model without seeing it.
    """
    digest = hashlib.sha256()
    for name in sorted(params):
        value = np.ascontiguousarray(params[name])
        digest.update(json.dumps([name, value.dtype.str, value.shape]).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class EncryptedUpdate:
    """One site's encrypted, weighted update for one round."""

    site: str
    server_round: int
    key_id: str
    layout: str
    base: str
    ciphertexts: tuple[bytes, ...]

    @property
    def num_bytes(self) -> int:
        return sum(len(c) for c in self.ciphertexts)

    def to_params(self) -> ParameterSet:
        """Return the update as uint8 tensors for the transport."""
        header = {"format": UPDATE_FORMAT, "version": WIRE_VERSION, "site": self.site,
                  "round": self.server_round, "key_id": self.key_id,
                  "layout": self.layout, "base": self.base,
                  "num_ciphertexts": len(self.ciphertexts)}
        return _to_params(header, self.ciphertexts)

    @classmethod
    def from_params(cls, params: Mapping[str, np.ndarray]) -> EncryptedUpdate:
        """Parse an update from the transport; raises ValueError with the reason."""
        header, ciphertexts = _from_params(params, UPDATE_FORMAT)
        return cls(_text(header, "site"), _integer(header, "round"),
                   _text(header, "key_id"), _text(header, "layout"),
                   _text(header, "base"), ciphertexts)


@dataclass(frozen=True)
class EncryptedAggregate:
    """The encrypted sum of a round's updates, which only sites can decrypt."""

    server_round: int
    key_id: str
    layout: str
    base: str
    sites: tuple[str, ...]
    ciphertexts: tuple[bytes, ...]

    @property
    def num_bytes(self) -> int:
        return sum(len(c) for c in self.ciphertexts)

    def to_params(self) -> ParameterSet:
        """Return the aggregate as uint8 tensors for the transport."""
        header = {"format": AGGREGATE_FORMAT, "version": WIRE_VERSION,
                  "round": self.server_round, "key_id": self.key_id,
                  "layout": self.layout, "base": self.base,
                  "sites": list(self.sites), "num_ciphertexts": len(self.ciphertexts)}
        return _to_params(header, self.ciphertexts)

    @classmethod
    def from_params(cls, params: Mapping[str, np.ndarray]) -> EncryptedAggregate:
        """Parse an aggregate from the transport; raises ValueError with the reason."""
        header, ciphertexts = _from_params(params, AGGREGATE_FORMAT)
        sites = header.get("sites")
        if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
            raise ValueError(f"header field 'sites' must be a list of names; "
                             f"got {sites!r}")
        return cls(_integer(header, "round"), _text(header, "key_id"),
                   _text(header, "layout"), _text(header, "base"), tuple(sites),
                   ciphertexts)


def is_encrypted(params: Mapping[str, np.ndarray]) -> bool:
    """Tell whether a parameter set carries CKKS ciphertexts, not a model."""
    return HEADER_TENSOR in params


def _to_params(header: dict[str, Any], ciphertexts: tuple[bytes, ...]) -> ParameterSet:
    text = json.dumps(header, separators=(",", ":")).encode()
    out: ParameterSet = {HEADER_TENSOR: np.frombuffer(text, dtype=np.uint8).copy()}
    for index, data in enumerate(ciphertexts):
        out[f"{CIPHERTEXT_PREFIX}{index:05d}"] = np.frombuffer(data, np.uint8).copy()
    return out


def _from_params(params: Mapping[str, np.ndarray], expected: str
                 ) -> tuple[dict[str, Any], tuple[bytes, ...]]:
    raw = params.get(HEADER_TENSOR)
    if raw is None:
        raise ValueError(f"tensor {HEADER_TENSOR!r} is missing, so this is not "
                         "an encrypted message (was homomorphic aggregation "
                         "enabled on both sides?)")
    try:
        header = json.loads(np.asarray(raw, dtype=np.uint8).tobytes())
    except ValueError as error:
        raise ValueError(f"header is not valid JSON: {error}") from None
    if not isinstance(header, dict) or header.get("format") != expected:
        found = header.get("format") if isinstance(header, dict) else header
        raise ValueError(f"header format must be {expected!r}; got {found!r}")
    if header.get("version") != WIRE_VERSION:
        raise ValueError(f"header version must be {WIRE_VERSION}; got "
                         f"{header.get('version')!r}")
    names = sorted(n for n in params if n != HEADER_TENSOR)
    wanted = _integer(header, "num_ciphertexts")
    expected_names = [f"{CIPHERTEXT_PREFIX}{i:05d}" for i in range(wanted)]
    if names != expected_names:
        raise ValueError(f"header lists {wanted} ciphertexts but the message has "
                         f"{len(names)} tensors besides the header")
    ciphertexts = []
    for name in names:
        value = params[name]
        if not isinstance(value, np.ndarray) or value.dtype != np.uint8 \
                or value.ndim != 1:
            raise ValueError(f"tensor {name!r} must be a 1-D uint8 array")
        ciphertexts.append(value.tobytes())
    return header, tuple(ciphertexts)


def _text(header: Mapping[str, Any], field: str) -> str:
    value = header.get(field)
    if not isinstance(value, str):
        raise ValueError(f"header field {field!r} must be a string; got {value!r}")
    return value


def _integer(header: Mapping[str, Any], field: str) -> int:
    value = header.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"header field {field!r} must be an integer >= 0; "
                         f"got {value!r}")
    return value
