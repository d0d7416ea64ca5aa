"""Primitives of secure aggregation, all from the ``cryptography`` package.

- key agreement: X25519;
- key derivation: HKDF-SHA256, salted with the round's random session id and
  labelled with the purpose and both site names, so no key serves twice;
- share encryption between sites: AES-256-GCM with a random 96-bit nonce and
  the session, round, sender and recipient as associated data;
- mask generation: the AES-128-CTR keystream of a derived key, read as uint64
  (128-bit keys match the 128-bit security of X25519).
"""

from __future__ import annotations

import json
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
"""Length of X25519 keys, derived AES keys and self-mask seeds."""

NONCE_BYTES = 12
_CTR_NONCE = bytes(16)
_LABEL = b"prifed secagg v1 "
_zeros = bytearray()


def generate_key_pair() -> tuple[X25519PrivateKey, bytes]:
    """Return a fresh X25519 private key and its raw 32-byte public key."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes_raw()


def private_bytes(private: X25519PrivateKey) -> bytes:
    """Return the raw 32 bytes of a private key, the secret that gets shared."""
    return private.private_bytes_raw()


def load_private(raw: bytes) -> X25519PrivateKey:
    """Rebuild a private key from its raw 32 bytes."""
    return X25519PrivateKey.from_private_bytes(raw)


def public_of(raw_private: bytes) -> bytes:
    """Return the raw public key of a raw private key."""
    return load_private(raw_private).public_key().public_bytes_raw()


def pair_key(private: X25519PrivateKey, peer_public: bytes, purpose: str,
             session: bytes, server_round: int, site_a: str, site_b: str) -> bytes:
    """Agree on a 32-byte key with a peer for one purpose in one round.

    Both sides derive the same key because the site names enter in sorted
    order. Raises ValueError when the peer's public key is not a valid point.
    """
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    label = json.dumps([purpose, server_round, sorted([site_a, site_b])])
    return derive(shared, session, label)


def derive(secret: bytes, session: bytes, label: str) -> bytes:
    """Derive a 32-byte key from a secret with HKDF-SHA256."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session,
                info=_LABEL + label.encode())
    return hkdf.derive(secret)


def share_context(session: bytes, server_round: int, sender: str,
                  recipient: str) -> bytes:
    """Return the associated data that binds a share ciphertext to its route."""
    return json.dumps([session.hex(), server_round, sender, recipient]).encode()


def seal(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt and authenticate with AES-256-GCM; the nonce leads the output."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def open_sealed(key: bytes, sealed: bytes, context: bytes) -> bytes:
    """Decrypt :func:`seal` output; raise ValueError when it fails to verify."""
    if len(sealed) < NONCE_BYTES + 16:
        raise ValueError(f"ciphertext is too short ({len(sealed)} bytes)")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                   context)
    except InvalidTag:
        raise ValueError("ciphertext failed authentication") from None


class MaskGenerator:
    """Expand keys into pseudorandom uint64 masks with AES-128-CTR.

    The output buffer is reused, so each mask is a view that stays valid only
    until the next call of :meth:`expand`.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._size = count * 8
        _grow_zeros(self._size)
        # update_into needs room for one cipher block beyond the data.
        self._out = np.empty(self._size + 16, dtype=np.uint8)

    def expand(self, key: bytes) -> np.ndarray:
        """Return ``count`` mask values from a derived key (first 16 bytes used)."""
        encryptor = Cipher(algorithms.AES(key[:16]), modes.CTR(_CTR_NONCE)).encryptor()
        written = encryptor.update_into(memoryview(_zeros)[:self._size],
                                        self._out.data)
        if written != self._size:
            raise RuntimeError(f"keystream returned {written} of {self._size} bytes")
        return self._out[:self._size].view(np.uint64)


def mask(key: bytes, count: int) -> np.ndarray:
    """Return ``count`` mask values from a key in a fresh array."""
    return MaskGenerator(count).expand(key).copy()


def _grow_zeros(size: int) -> None:
    # One shared buffer of zero bytes is the plaintext of every keystream,
    # so expanding a mask writes only its output.
    if len(_zeros) < size:
        _zeros.extend(bytes(size - len(_zeros)))
