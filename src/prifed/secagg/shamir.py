"""Shamir secret sharing over the prime field of the Mersenne prime 2**521 - 1.

Secure aggregation shares two 32-byte secrets per site (the X25519 mask key
and the self-mask seed), with up to a few hundred share holders. The field is
large enough to hold a 64-byte secret in one element, so no secret is cut into
pieces. pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir`` was considered
and not used: it shares exactly 16-byte secrets in GF(2**128), in pure-Python
field arithmetic that is slow at hundreds of holders. Arithmetic here uses
Python integers, and share holders are the field points 1, 2, 3, ...
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

PRIME = 2**521 - 1
"""The field modulus, a Mersenne prime (M521)."""

SHARE_BYTES = 66
"""Length of one share value: big-endian, ceil(521 / 8) bytes."""

MAX_SECRET_BYTES = 65


class ShareError(ValueError):
    """A share or a set of shares cannot be used for reconstruction."""


def split(secret: bytes, threshold: int, points: Sequence[int]) -> dict[int, bytes]:
    """Split ``secret`` so that any ``threshold`` of the shares rebuild it.

    Returns one share per point; fewer than ``threshold`` shares reveal
    nothing about the secret. The polynomial's coefficients come from the
    operating system's random source.
    """
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"secret must be at most {MAX_SECRET_BYTES} bytes; "
                         f"got {len(secret)}")
    _check_points(points)
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold must be between 1 and {len(points)} share "
                         f"holders; got {threshold}")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for point in points:
        value = 0
        for coefficient in reversed(coefficients):
            value = (value * point + coefficient) % PRIME
        shares[point] = value.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int, length: int) -> bytes:
    """Rebuild a ``length``-byte secret from at least ``threshold`` shares.

    Uses the ``threshold`` shares with the smallest points. Shares beyond
    those are not checked for consistency, so a wrong share among them goes
    unnoticed. Callers that can check the secret (against a public key) do.
    """
    if len(shares) < threshold:
        raise ShareError(f"need {threshold} shares to rebuild the secret; "
                         f"got {len(shares)}")
    points = tuple(sorted(shares)[:threshold])
    _check_points(points)
    secret = 0
    for point, weight in zip(points, lagrange_at_zero(points), strict=True):
        secret = (secret + weight * share_value(shares[point])) % PRIME
    if secret.bit_length() > 8 * length:
        raise ShareError(f"shares rebuild a value wider than {length} bytes, "
                         "so at least one share is wrong")
    return secret.to_bytes(length, "big")


def share_value(share: bytes) -> int:
    """Parse one share, checking its length and that it is a field element."""
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        size = len(share) if isinstance(share, bytes) else type(share).__name__
        raise ShareError(f"share must be {SHARE_BYTES} bytes; got {size}")
    value = int.from_bytes(share, "big")
    if value >= PRIME:
        raise ShareError("share value is not below the field prime 2**521 - 1")
    return value


@lru_cache(maxsize=256)
def lagrange_at_zero(points: tuple[int, ...]) -> tuple[int, ...]:
    """Return the Lagrange weights that interpolate at 0 from ``points``.

    Reconstruction from the same holders repeats for every site of a round,
    so the weights are cached per set of points.
    """
    weights = []
    for i, xi in enumerate(points):
        numerator = 1
        denominator = 1
        for j, xj in enumerate(points):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        weights.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return tuple(weights)


def _check_points(points: Sequence[int]) -> None:
    if len(set(points)) != len(points):
        raise ValueError(f"share points must be distinct; got {sorted(points)}")
    for point in points:
        if not isinstance(point, int) or not 0 < point < PRIME:
            raise ValueError(f"share points must be integers in 1..p-1; got {point!r}")
