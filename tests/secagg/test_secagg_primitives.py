"""Shamir sharing, fixed-point encoding, bit packing and message framing."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from prifed.core.secure_sum import pack_message, unpack_message
from prifed.errors import ConfigError, ProtocolError
from prifed.secagg import crypto, shamir
from prifed.secagg.encoding import (
    FixedPoint,
    decode_sum,
    encode,
    pack_bits,
    packed_size,
    to_signed,
    unpack_bits,
)


def test_prime_is_mersenne_521() -> None:
    assert shamir.PRIME == 2**521 - 1
    # Fermat checks to several bases; M521 is a known Mersenne prime.
    for base in (2, 3, 5, 7, 11, 13):
        assert pow(base, shamir.PRIME - 1, shamir.PRIME) == 1
    assert shamir.SHARE_BYTES == math.ceil(521 / 8)


def test_shamir_any_threshold_subset_rebuilds() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares, 3):
        rebuilt = shamir.combine({p: shares[p] for p in subset}, 3, 32)
        assert rebuilt == secret


def test_shamir_fewer_than_threshold_fails() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    with pytest.raises(shamir.ShareError, match="need 3 shares"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3, 32)
    # Interpolating two shares of a degree-2 polynomial as a line gives a
    # field element that is not the secret (it fails the 32-byte width check
    # except with probability about 2**-265).
    with pytest.raises(shamir.ShareError, match="wider than 32 bytes"):
        shamir.combine({1: shares[1], 2: shares[2]}, 2, 32)


def test_lagrange_weights_by_hand() -> None:
    # Points 1 and 2: f(0) = 2 f(1) - f(2).
    assert shamir.lagrange_at_zero((1, 2)) == (2, shamir.PRIME - 1)
    # Points 1, 2, 3: f(0) = 3 f(1) - 3 f(2) + f(3).
    assert shamir.lagrange_at_zero((1, 2, 3)) == (3, shamir.PRIME - 3, 1)


def test_shamir_share_checks() -> None:
    with pytest.raises(shamir.ShareError, match="66 bytes; got 65"):
        shamir.share_value(bytes(65))
    with pytest.raises(shamir.ShareError, match="not below the field prime"):
        shamir.share_value(shamir.PRIME.to_bytes(66, "big"))
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(b"x", 2, [1, 1, 2])
    with pytest.raises(ValueError, match="threshold must be between 1 and 2"):
        shamir.split(b"x", 3, [1, 2])


def test_modulus_bits_by_hand() -> None:
    encoding = FixedPoint(clip=1.0, precision_bits=16, max_samples=1000)
    # One site contributes at most 1000 * 1.0 * 2**16 = 65,536,000 in absolute
    # value; 10 sites 655,360,000, which needs 30 bits plus a sign bit.
    assert encoding.element_bound(100) == 65_536_000
    assert encoding.modulus_bits(10, 100) == 31
    assert (10 * 65_536_000).bit_length() == 30


def test_modulus_refusal_names_max_sites() -> None:
    encoding = FixedPoint(clip=8.0, precision_bits=24, max_samples=2**28)
    bound = 2**28 * 8 * 2**24
    largest = (2**63 - 1) // bound
    assert encoding.max_sites(10) == largest == 255
    assert encoding.modulus_bits(largest, 10) == 64
    with pytest.raises(ConfigError, match="the largest number of sites this "
                       "configuration takes is 255") as caught:
        encoding.modulus_bits(largest + 1, 10)
    assert "cannot take 256 sites" in str(caught.value)


def test_fixed_point_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="clip must be a positive number; got 0"):
        FixedPoint(clip=0.0)
    with pytest.raises(ConfigError, match="precision_bits must be between 0 and 52"):
        FixedPoint(precision_bits=60)
    with pytest.raises(ConfigError, match="max_samples must be at least 1"):
        FixedPoint(max_samples=0)


def test_encode_clips_and_counts() -> None:
    reference = {"w": np.zeros(5, dtype=np.float32)}
    update = {"w": np.array([0.5, -0.25, 3.0, -2.0, 1.0], dtype=np.float32)}
    encoding = FixedPoint(clip=1.0, precision_bits=4, max_samples=100)
    encoded = encode(update, reference, 7, encoding)
    values = encoded.vector.view(np.int64)
    # 7 * 16 = 112 steps per unit; 3.0 and -2.0 clip to +-1.
    assert values[:5].tolist() == [56, -28, 112, -112, 112]
    assert values[5] == 7
    assert values[6] == 2
    assert encoded.clipped == 2


def test_encode_caps_weight_and_counts_it() -> None:
    reference = {"w": np.zeros(2)}
    update = {"w": np.array([0.5, 0.5])}
    encoded = encode(update, reference, 250, FixedPoint(1.0, 2, max_samples=100))
    assert encoded.weight == 100
    assert encoded.clipped == 1
    assert encoded.vector.view(np.int64)[:2].tolist() == [200, 200]


def test_sum_at_bound_does_not_wrap() -> None:
    # Every site at +clip with the largest weight: the second value's sum is
    # 60% of the way to the wrap point of the 42-bit modulus, where a 32-bit
    # field would have wrapped long before.
    encoding = FixedPoint(clip=1.0, precision_bits=16, max_samples=100_000)
    reference = {"w": np.zeros(4)}
    sites = 200
    bits = encoding.modulus_bits(sites, 4)
    total = np.zeros(6, dtype=np.uint64)
    for sign in [1.0] * (sites // 2) + [-1.0] * (sites // 2 - 1) + [1.0]:
        update = {"w": np.array([sign * 5.0, 1.0, -1.0, 0.0])}
        total += encode(update, reference, 100_000, encoding).vector
    deltas, weight, clipped = decode_sum(total, bits, reference, encoding)
    assert bits == 42
    assert deltas["w"].tolist() == [2 * 100_000.0, sites * 100_000.0,
                                    -sites * 100_000.0, 0.0]
    assert weight == sites * 100_000
    assert clipped == sites


@pytest.mark.parametrize("bits", [1, 7, 8, 31, 33, 41, 63, 64])
@pytest.mark.parametrize("count", [0, 1, 63, 64, 65, 200])
def test_pack_bits_round_trip(bits: int, count: int) -> None:
    rng = np.random.default_rng(bits * 1000 + count)
    values = rng.integers(0, 2**63, size=count, dtype=np.uint64) * np.uint64(2)
    values += rng.integers(0, 2, size=count, dtype=np.uint64)
    if bits < 64:
        values &= np.uint64(2**bits - 1)
    data = pack_bits(values, bits)
    assert len(data) == packed_size(count, bits) == -(-count // 64) * bits * 8
    assert np.array_equal(unpack_bits(data, count, bits), values)


def test_pack_bits_layout_by_hand() -> None:
    # One block of 64 three-bit values fills three words. Values 5 and 3 pack
    # little-endian as 101 then 011, so the first byte is 0b011101 = 29.
    data = pack_bits(np.array([5, 3], dtype=np.uint64), 3)
    assert data == bytes([29]) + bytes(23)


def test_unpack_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="must be 96 bytes .* got 95"):
        unpack_bits(bytes(95), 4, 12)


def test_to_signed_reads_twos_complement() -> None:
    values = np.array([0, 1, 2**40 - 1, 2**40, 2**41 - 1], dtype=np.uint64)
    assert to_signed(values, 41).tolist() == [0, 1, 2**40 - 1, -(2**40), -1]
    assert to_signed(np.array([2**63], dtype=np.uint64), 64).tolist() == [-(2**63)]


def test_mask_is_aes_ctr_keystream() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(32))
    # AES-128 keyed with the first half of the derived 32-byte key.
    encryptor = Cipher(algorithms.AES(key[:16]), modes.CTR(bytes(16))).encryptor()
    expected = np.frombuffer(encryptor.update(bytes(80)), dtype="<u8")
    assert np.array_equal(crypto.mask(key, 10), expected)
    assert not np.array_equal(crypto.mask(bytes(32), 10), expected)


def test_pair_key_is_symmetric() -> None:
    first, first_public = crypto.generate_key_pair()
    second, second_public = crypto.generate_key_pair()
    session = bytes(16)
    one = crypto.pair_key(first, second_public, "mask", session, 2, "a", "b")
    two = crypto.pair_key(second, first_public, "mask", session, 2, "b", "a")
    other_round = crypto.pair_key(first, second_public, "mask", session, 3, "a", "b")
    assert one == two
    assert one != other_round


def test_sealed_share_is_bound_to_route() -> None:
    key = bytes(32)
    sealed = crypto.seal(key, b"share", b"a->b")
    assert crypto.open_sealed(key, sealed, b"a->b") == b"share"
    with pytest.raises(ValueError, match="failed authentication"):
        crypto.open_sealed(key, sealed, b"a->c")


def test_message_framing_round_trip() -> None:
    message = {"phase": "x", "round": 3, "blob": b"\x00\x01",
               "nested": [b"", {"inner": b"zz"}], "none": None, "f": 0.5}
    framed = pack_message(message)
    assert unpack_message(framed) == message
    # Raw bytes travel as they are: the frame is the JSON header plus 4 bytes.
    assert framed.endswith(b"\x00\x01zz")


def test_message_framing_rejects_malformed() -> None:
    framed = pack_message({"phase": "x", "round": 1, "blob": b"abc"})
    with pytest.raises(ProtocolError, match="body has 4 bytes; its header "
                       "describes 3"):
        unpack_message(framed + b"!")
    with pytest.raises(ProtocolError, match="header is malformed"):
        unpack_message(b"\x00\x00\x00\x09{not json")
    with pytest.raises(TypeError, match="JSON values or bytes; got ndarray"):
        pack_message({"phase": "x", "round": 1, "bad": np.zeros(2)})
