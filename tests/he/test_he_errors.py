"""Bad ciphertexts: each is a clear error that names the site."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from prifed.errors import UpdateRejected
from prifed.he.combine import EncryptedSum
from prifed.he.errors import DecryptionError
from prifed.he.keys import FederationKey, create_federation_key, rotate_key
from prifed.he.packing import EncryptedAggregate, EncryptedUpdate, Layout
from prifed.he.params import select_params
from prifed.he.site import decrypt_aggregate, encrypt_update


@pytest.fixture
def layout(site_key: FederationKey) -> Layout:
    # Two ciphertexts: slots + 10 values plus the two header slots.
    return Layout.of({"x": np.zeros(site_key.params.slots + 10)},
                     site_key.params.slots)


def encrypt(key: FederationKey, layout: Layout, site: str, value: float = 0.5,
            base: str = "b0") -> EncryptedUpdate:
    update = {"x": np.full(layout.num_values, value)}
    encrypted, _ = encrypt_update(key, layout, site, 1, update, 10.0, base)
    return encrypted


def test_ciphertext_under_another_key_is_rejected(site_key: FederationKey,
                                                  coord_key: FederationKey,
                                                  layout: Layout) -> None:
    old = rotate_key(site_key)
    combiner = EncryptedSum(coord_key, layout, 1)
    with pytest.raises(UpdateRejected) as error:
        combiner.add(encrypt(old, layout, "hungary"))
    assert error.value.site == "hungary"
    assert "ciphertexts are under key" in error.value.reason
    assert combiner.sites == []


def test_forged_key_id_fails_decryption(
        site_key: FederationKey, coord_key: FederationKey, layout: Layout) -> None:
    # Same parameters, other secret key, but labelled with the current key id:
    # the coordinator cannot tell, and the sum decrypts to noise.
    impostor = replace(rotate_key(site_key), key_id=site_key.key_id)
    combiner = EncryptedSum(coord_key, layout, 1)
    combiner.add(encrypt(site_key, layout, "cleveland"))
    combiner.add(encrypt(impostor, layout, "hungary"))
    with pytest.raises(DecryptionError) as error:
        decrypt_aggregate(site_key, layout, "cleveland", combiner.result())
    assert error.value.site == "cleveland"
    assert "decrypted contribution count is" in error.value.reason
    assert "aggregate lists 2 sites" in error.value.reason


def test_ciphertext_with_other_parameters_cannot_be_parsed(
        site_key: FederationKey, coord_key: FederationKey) -> None:
    other = create_federation_key(select_params(4, 1.0, 1e-9, 1000.0))
    assert other.params.poly_modulus_degree != site_key.params.poly_modulus_degree
    small = Layout.of({"x": np.zeros(5)}, site_key.params.slots)
    foreign_layout = Layout.of({"x": np.zeros(5)}, other.params.slots)
    foreign = encrypt(other, foreign_layout, "va")
    forged = replace(foreign, key_id=site_key.key_id, layout=small.digest)
    combiner = EncryptedSum(coord_key, small, 1)
    with pytest.raises(UpdateRejected) as error:
        combiner.add(forged)
    assert error.value.site == "va"
    assert "ciphertext 1 of 1 cannot be parsed" in error.value.reason


def test_truncated_ciphertext_is_rejected_and_sum_unchanged(
        site_key: FederationKey, coord_key: FederationKey, layout: Layout) -> None:
    combiner = EncryptedSum(coord_key, layout, 1)
    combiner.add(encrypt(site_key, layout, "cleveland", value=0.25))
    bad = encrypt(site_key, layout, "hungary", value=0.75)
    first, second = bad.ciphertexts
    truncated = replace(bad, ciphertexts=(first, second[: len(second) // 2]))
    with pytest.raises(UpdateRejected) as error:
        combiner.add_params("hungary", truncated.to_params())
    assert error.value.site == "hungary"
    assert "ciphertext 2 of 2 cannot be parsed" in error.value.reason
    assert "truncated" in error.value.reason
    decrypted = decrypt_aggregate(site_key, layout, "cleveland", combiner.result())
    assert decrypted.sites == ("cleveland",)
    np.testing.assert_allclose(decrypted.mean["x"], 0.25, atol=1e-6)


def test_wrong_number_of_ciphertexts_is_rejected(site_key: FederationKey,
                                                 coord_key: FederationKey,
                                                 layout: Layout) -> None:
    short = encrypt(site_key, layout, "switzerland")
    short = replace(short, ciphertexts=short.ciphertexts[:1])
    combiner = EncryptedSum(coord_key, layout, 1)
    with pytest.raises(UpdateRejected) as error:
        combiner.add(short)
    assert error.value.site == "switzerland"
    assert "expected 2 ciphertexts" in error.value.reason
    assert "got 1" in error.value.reason


def test_aggregate_missing_a_ciphertext_fails_at_site(
        site_key: FederationKey, coord_key: FederationKey, layout: Layout) -> None:
    combiner = EncryptedSum(coord_key, layout, 1)
    combiner.add(encrypt(site_key, layout, "cleveland"))
    aggregate = combiner.result()
    cut = replace(aggregate, ciphertexts=aggregate.ciphertexts[1:])
    with pytest.raises(DecryptionError) as error:
        decrypt_aggregate(site_key, layout, "va", cut)
    assert error.value.site == "va"
    assert "expected 2 ciphertexts" in error.value.reason


def test_truncated_aggregate_fails_at_site(site_key: FederationKey,
                                           coord_key: FederationKey,
                                           layout: Layout) -> None:
    combiner = EncryptedSum(coord_key, layout, 1)
    combiner.add(encrypt(site_key, layout, "cleveland"))
    aggregate = combiner.result()
    first, second = aggregate.ciphertexts
    cut = replace(aggregate, ciphertexts=(first[:100], second))
    with pytest.raises(DecryptionError) as error:
        decrypt_aggregate(site_key, layout, "va", cut)
    assert error.value.site == "va"
    assert "ciphertext 1 of 2 cannot be parsed" in error.value.reason


def test_header_and_tensors_must_agree(site_key: FederationKey,
                                       coord_key: FederationKey,
                                       layout: Layout) -> None:
    params = encrypt(site_key, layout, "cleveland").to_params()
    del params["he.ct.00001"]
    combiner = EncryptedSum(coord_key, layout, 1)
    with pytest.raises(UpdateRejected) as error:
        combiner.add_params("cleveland", params)
    assert "header lists 2 ciphertexts but the message has 1" in error.value.reason


def test_plain_model_sent_to_coordinator_is_rejected(
        coord_key: FederationKey, layout: Layout) -> None:
    combiner = EncryptedSum(coord_key, layout, 1)
    with pytest.raises(UpdateRejected) as error:
        combiner.add_params("va", {"x": np.zeros(3, np.float32)})
    assert error.value.site == "va"
    assert "'he.header' is missing" in error.value.reason


@pytest.mark.parametrize("change, text", [
    ({"server_round": 2}, "encrypted update is for round 2; this is round 1"),
    ({"layout": "0123456789abcdef"}, "model layout 0123456789abcdef differs"),
    ({"base": "other"}, "site trained from global model other"),
])
def test_mismatched_update_fields_are_rejected(
        site_key: FederationKey, coord_key: FederationKey, layout: Layout,
        change: dict[str, object], text: str) -> None:
    combiner = EncryptedSum(coord_key, layout, 1)
    combiner.add(encrypt(site_key, layout, "cleveland"))
    with pytest.raises(UpdateRejected, match=text):
        combiner.add(replace(encrypt(site_key, layout, "hungary"), **change))


def test_duplicate_site_and_label_are_rejected(site_key: FederationKey,
                                               coord_key: FederationKey,
                                               layout: Layout) -> None:
    combiner = EncryptedSum(coord_key, layout, 1)
    update = encrypt(site_key, layout, "cleveland")
    combiner.add(update)
    with pytest.raises(UpdateRejected, match="second encrypted update"):
        combiner.add(update)
    with pytest.raises(UpdateRejected, match="labelled as coming from site 'va'"):
        combiner.add_params("hungary", encrypt(site_key, layout, "va").to_params())


def test_more_sites_than_the_key_allows_are_rejected(
        site_key: FederationKey, coord_key: FederationKey) -> None:
    small = Layout.of({"x": np.zeros(3)}, site_key.params.slots)
    combiner = EncryptedSum(coord_key, small, 1)
    for index in range(site_key.params.num_sites):
        combiner.add(encrypt(site_key, small, f"site-{index}"))
    with pytest.raises(UpdateRejected) as error:
        combiner.add(encrypt(site_key, small, "one-too-many"))
    assert "made for sums of at most 4 sites" in error.value.reason
    assert "rotate the key with a larger --sites" in error.value.reason


def test_malformed_aggregate_header_is_value_error() -> None:
    with pytest.raises(ValueError, match="header format must be"):
        EncryptedAggregate.from_params(
            {"he.header": np.frombuffer(b'{"format": "x"}', np.uint8)})
