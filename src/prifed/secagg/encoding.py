"""Fixed-point encoding of updates, the no-wrap modulus rule and bit packing.

A site encodes its update as integers modulo 2**bits: the model delta (local
model minus this round's global model) is clipped to [-clip, clip] per value,
multiplied by the sample count and by 2**precision_bits, and rounded. Two
integers follow the values: the sample count and the number of clipped values.
Summed over sites, each integer stays below 2**(bits - 1) in absolute value,
so the sum modulo 2**bits decodes to the exact integer sum and never wraps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from prifed.core.params import ParameterSet
from prifed.errors import ConfigError

MAX_BITS = 64
"""Masked integers live in numpy uint64, so the modulus is at most 2**64."""

TRAILER = 2
"""Integers after the model values: the sample count and the clipped count."""

_FLOAT64_EPS = 2.0**-52


@dataclass(frozen=True)
class FixedPoint:
    """The public encoding settings of a round, shared by every site."""

    clip: float = 1.0
    precision_bits: int = 16
    max_samples: int = 100_000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be a positive number; got {self.clip}")
        if not 0 <= self.precision_bits <= 52:
            raise ConfigError("precision_bits must be between 0 and 52; "
                              f"got {self.precision_bits}")
        if self.max_samples < 1:
            raise ConfigError(f"max_samples must be at least 1; got {self.max_samples}")

    @property
    def scale(self) -> float:
        """Return 2**precision_bits, the number of integer steps per unit."""
        return float(2**self.precision_bits)

    def element_bound(self, num_values: int) -> int:
        """Return the largest absolute integer one site can contribute."""
        weighted = math.ceil(self.max_samples * self.clip * self.scale)
        return max(weighted, self.max_samples, num_values)

    def modulus_bits(self, num_sites: int, num_values: int) -> int:
        """Return the bits of the smallest power-of-two modulus that cannot wrap.

        Raises ConfigError naming the largest number of sites that fits when
        ``num_sites`` needs more than 64 bits.
        """
        if num_sites < 1:
            raise ConfigError(f"number of sites must be at least 1; got {num_sites}")
        bound = num_sites * self.element_bound(num_values)
        bits = bound.bit_length() + 1
        if bits > MAX_BITS:
            raise ConfigError(
                f"secure aggregation cannot take {num_sites} sites: clip "
                f"{self.clip}, precision 2**-{self.precision_bits} and up to "
                f"{self.max_samples} samples per site need a {bits}-bit modulus, "
                f"more than the {MAX_BITS}-bit maximum; the largest number of "
                f"sites this configuration takes is {self.max_sites(num_values)}. "
                "Lower precision_bits, clip or max_samples, or take fewer sites")
        return bits

    def max_sites(self, num_values: int) -> int:
        """Return the largest number of sites whose sum fits in 64 bits."""
        return (2 ** (MAX_BITS - 1) - 1) // self.element_bound(num_values)

    def max_error(self, num_sites: int, total_weight: float) -> float:
        """Bound the absolute error per value of the weighted mean.

        Each site's rounding is at most half a step plus float64 rounding of
        the product, and the mean divides the sum by ``scale * total_weight``.
        """
        if total_weight <= 0:
            return math.inf
        per_site = 0.5 + self.element_bound(0) * _FLOAT64_EPS
        return num_sites * per_site / (self.scale * total_weight)


@dataclass(frozen=True)
class Encoded:
    """One site's integer vector (uint64, two's complement) and its counts."""

    vector: np.ndarray
    weight: int
    clipped: int


def encode(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
           num_samples: int, encoding: FixedPoint) -> Encoded:
    """Clip, weight and round one site's model delta to integers.

    The weight is the sample count, capped at ``max_samples``; a capped weight
    counts as one clipped value.
    """
    delta = flatten(update, reference) - flatten(reference, reference)
    clipped = int(np.count_nonzero(np.abs(delta) > encoding.clip))
    np.clip(delta, -encoding.clip, encoding.clip, out=delta)
    weight = min(int(num_samples), encoding.max_samples)
    if weight < num_samples:
        clipped += 1
    delta *= weight * encoding.scale
    integers = np.rint(delta).astype(np.int64)
    vector = np.empty(delta.size + TRAILER, dtype=np.uint64)
    vector[:delta.size] = integers.view(np.uint64)
    vector[delta.size] = weight
    vector[delta.size + 1] = clipped
    return Encoded(vector, weight, clipped)


def decode_sum(total: np.ndarray, bits: int, reference: Mapping[str, np.ndarray],
               encoding: FixedPoint) -> tuple[ParameterSet, int, int]:
    """Turn the unmasked sum into the weighted delta sum, total weight and clips.

    ``total`` contains the sum modulo 2**bits. Values at or above 2**(bits - 1)
    are negative. Returns the sum of weight times delta per tensor (float64),
    the sum of weights and the number of clipped values.
    """
    signed = to_signed(total, bits)
    size = signed.size - TRAILER
    weight = int(signed[size])
    clipped = int(signed[size + 1])
    weighted = signed[:size].astype(np.float64) / encoding.scale
    return unflatten(weighted, reference), weight, clipped


def to_signed(values: np.ndarray, bits: int) -> np.ndarray:
    """Read integers modulo 2**bits as signed int64 in [-2**(bits-1), 2**(bits-1))."""
    mask = np.uint64(2**bits - 1) if bits < MAX_BITS else np.uint64(2**64 - 1)
    reduced = values & mask
    if bits == MAX_BITS:
        return reduced.view(np.int64)
    # Subtracting 2**bits in uint64 wraps to the two's complement of the
    # negative value, which the int64 view then reads.
    shift = np.where(reduced >= np.uint64(2 ** (bits - 1)), np.uint64(2**bits),
                     np.uint64(0))
    return (reduced - shift).view(np.int64)


def vector_length(reference: Mapping[str, np.ndarray]) -> int:
    """Return how many integers a site sends: the values plus the trailer."""
    return int(sum(np.asarray(v).size for v in reference.values())) + TRAILER


def flatten(params: Mapping[str, np.ndarray],
            reference: Mapping[str, np.ndarray]) -> np.ndarray:
    """Concatenate tensors in the reference's order into one float64 vector."""
    parts = [np.asarray(params[name], dtype=np.float64).ravel() for name in reference]
    if not parts:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(parts)


def unflatten(vector: np.ndarray, reference: Mapping[str, np.ndarray]) -> ParameterSet:
    """Split a float64 vector back into tensors shaped like the reference."""
    result: ParameterSet = {}
    start = 0
    for name, value in reference.items():
        size = int(np.asarray(value).size)
        result[name] = vector[start:start + size].reshape(np.shape(value))
        start += size
    return result


def packed_size(count: int, bits: int) -> int:
    """Return the bytes that ``count`` integers of ``bits`` bits pack into.

    Values pack in blocks of 64, each block filling ``bits`` 64-bit words, so
    the size rounds up to a whole block (at most 63 values of padding).
    """
    return _groups(count) * bits * 8


def padded_length(count: int) -> int:
    """Return ``count`` rounded up to whole blocks of 64 values."""
    return _groups(count) * 64


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack integers below 2**bits into ``bits`` little-endian words per 64.

    The padded vector is read as 64 lanes of equal length; lane ``j`` holds
    bits ``j * bits`` to ``(j + 1) * bits - 1`` of each block. The packing
    then runs as 64 vectorised steps whatever the vector length.
    """
    groups = _groups(values.size)
    padded = np.zeros(groups * 64, dtype=np.uint64)
    padded[:values.size] = values
    lanes = padded.reshape(64, groups)
    words = np.zeros((bits, groups), dtype=np.uint64)
    for lane in range(64):
        word, offset = divmod(lane * bits, 64)
        words[word] |= lanes[lane] << np.uint64(offset)
        if offset + bits > 64:
            words[word + 1] |= lanes[lane] >> np.uint64(64 - offset)
    return words.astype("<u8", copy=False).tobytes()


def add_packed(total: np.ndarray, data: bytes, bits: int) -> None:
    """Add packed integers to ``total`` (uint64, padded length), modulo 2**64.

    Only the low ``bits`` bits of each sum are meaningful: the bits above
    carry parts of neighbouring values, which addition never moves down, so
    the caller reduces modulo 2**bits once at the end.
    """
    groups = total.size // 64
    if len(data) != groups * bits * 8:
        raise ValueError(f"packed vector must be {groups * bits * 8} bytes "
                         f"({groups * 64} values of {bits} bits); got {len(data)}")
    words = np.frombuffer(data, dtype="<u8").reshape(bits, groups)
    lanes = total.reshape(64, groups)
    scratch = np.empty(groups, dtype=np.uint64)
    spill = np.empty(groups, dtype=np.uint64)
    for lane in range(64):
        word, offset = divmod(lane * bits, 64)
        np.right_shift(words[word], np.uint64(offset), out=scratch)
        if offset + bits > 64:
            np.left_shift(words[word + 1], np.uint64(64 - offset), out=spill)
            scratch |= spill
        lanes[lane] += scratch


def unpack_bits(data: bytes, count: int, bits: int) -> np.ndarray:
    """Read ``count`` integers of ``bits`` bits written by :func:`pack_bits`."""
    if len(data) != packed_size(count, bits):
        raise ValueError(f"packed vector must be {packed_size(count, bits)} bytes "
                         f"({count} values of {bits} bits); got {len(data)}")
    total = np.zeros(padded_length(count), dtype=np.uint64)
    add_packed(total, data, bits)
    if bits < MAX_BITS:
        total &= np.uint64(2**bits - 1)
    return total[:count]


def _groups(count: int) -> int:
    return -(-count // 64)
