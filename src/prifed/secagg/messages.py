"""Phase names and field checks shared by the site and coordinator sides.

A round runs four phases, each one request from the coordinator to every
remaining site and at most one reply back:

1. ``advertise_keys``: the coordinator sends the round's public parameters;
   a site replies with two X25519 public keys (one for share encryption, one
   for mask agreement).
2. ``share_keys``: the coordinator relays the neighbours' public keys; a site
   replies with its Shamir shares, one AES-GCM ciphertext per neighbour.
3. ``masked_input``: the coordinator relays the ciphertexts addressed to the
   site; the site replies with its masked, packed integer vector.
4. ``unmask``: the coordinator names which neighbours delivered and which
   dropped. The site replies with self-mask seed shares of the former and
   mask-key shares of the latter, and never with both for one site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ADVERTISE_KEYS = "advertise_keys"
SHARE_KEYS = "share_keys"
MASKED_INPUT = "masked_input"
UNMASK = "unmask"
PHASES = (ADVERTISE_KEYS, SHARE_KEYS, MASKED_INPUT, UNMASK)

PROTOCOL = "prifed-secagg/1"
"""Value of the ``protocol`` field of the first request."""


def require_bytes(message: Mapping[str, Any], key: str,
                  length: int | None = None) -> bytes:
    """Return ``message[key]`` as bytes, checking its length when given."""
    value = message.get(key)
    if not isinstance(value, bytes):
        raise ValueError(f"field {key!r} must be bytes; got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"field {key!r} must be {length} bytes; got {len(value)}")
    return value


def require_int(message: Mapping[str, Any], key: str) -> int:
    """Return ``message[key]`` as an int (a bool does not count)."""
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"field {key!r} must be an integer; got {value!r}")
    return value


def require_float(message: Mapping[str, Any], key: str) -> float:
    """Return ``message[key]`` as a float, accepting an int."""
    value = message.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"field {key!r} must be a number; got {value!r}")
    return float(value)


def require_dict(message: Mapping[str, Any], key: str) -> dict[str, Any]:
    """Return ``message[key]`` as a dict with string keys."""
    value = message.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"field {key!r} must be an object; got "
                         f"{type(value).__name__}")
    return value


def require_names(message: Mapping[str, Any], key: str) -> list[str]:
    """Return ``message[key]`` as a list of distinct site names."""
    value = message.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"field {key!r} must be a list of site names; got "
                         f"{type(value).__name__}")
    if len(set(value)) != len(value):
        raise ValueError(f"field {key!r} names a site twice")
    return value


def bytes_by_site(message: Mapping[str, Any], key: str,
                  length: int | None = None) -> dict[str, bytes]:
    """Return ``message[key]`` as a dict of site name to bytes."""
    table = require_dict(message, key)
    for site, value in table.items():
        if not isinstance(value, bytes):
            raise ValueError(f"field {key!r} entry {site!r} must be bytes; got "
                             f"{type(value).__name__}")
        if length is not None and len(value) != length:
            raise ValueError(f"field {key!r} entry {site!r} must be {length} "
                             f"bytes; got {len(value)}")
    return table
