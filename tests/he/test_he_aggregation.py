"""Encrypted against plain weighted aggregation, packing and clipping."""

from __future__ import annotations

import numpy as np
import pytest
from he_cases import plain_weighted_mean

from prifed.errors import UpdateRejected
from prifed.he.combine import EncryptedSum
from prifed.he.keys import FederationKey, coordinator_key, create_federation_key
from prifed.he.packing import EncryptedAggregate, EncryptedUpdate, Layout
from prifed.he.params import select_params
from prifed.he.site import decrypt_aggregate, encrypt_update


def aggregate_encrypted(key: FederationKey, updates: list[np.ndarray],
                        weights: list[float]) -> tuple[np.ndarray, float, int]:
    """Encrypt at each site, add at the coordinator, decrypt at one site."""
    template = {"x": np.zeros(updates[0].shape, np.float64)}
    layout = Layout.of(template, key.params.slots)
    combiner = EncryptedSum(coordinator_key(key), layout, server_round=1)
    clipped = 0
    for index, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        encrypted, report = encrypt_update(key, layout, f"site-{index}", 1,
                                           {"x": update}, weight, base="b0")
        clipped += report.clipped
        # Through the transport's form: uint8 tensors.
        combiner.add_params(f"site-{index}", encrypted.to_params())
    aggregate = EncryptedAggregate.from_params(combiner.result().to_params())
    decrypted = decrypt_aggregate(key, layout, "site-0", aggregate)
    return decrypted.mean["x"], decrypted.error_bound, clipped


@pytest.mark.parametrize("sites, size", [(2, 10_000), (10, 3_000), (100, 300)])
def test_encrypted_mean_matches_plain_within_bound(sites: int, size: int) -> None:
    rng = np.random.default_rng(sites)
    key = create_federation_key(select_params(sites, 1.0, 1e-6, 1000.0))
    updates = [rng.uniform(-1, 1, size) for _ in range(sites)]
    weights = [float(w) for w in rng.integers(1, 1001, sites)]

    mean, bound, clipped = aggregate_encrypted(key, updates, weights)

    error = np.abs(mean - plain_weighted_mean(updates, weights)).max()
    assert clipped == 0
    assert bound <= 1e-6
    assert error <= bound
    # CKKS is approximate: a zero error would mean nothing was encrypted.
    assert error > 0


def test_heart_sized_model_aggregates(site_key: FederationKey) -> None:
    rng = np.random.default_rng(7)
    updates = [rng.normal(0, 0.05, 14) for _ in range(4)]
    weights = [200.0, 171.0, 30.0, 85.0]
    mean, bound, _ = aggregate_encrypted(site_key, updates, weights)
    assert np.abs(mean - plain_weighted_mean(updates, weights)).max() <= bound


def test_out_of_range_values_are_clipped_and_counted(site_key: FederationKey
                                                     ) -> None:
    first = np.array([0.5, 1.5, -3.0, 0.25])
    second = np.array([0.1, 0.2, 0.3, 0.4])
    mean, bound, clipped = aggregate_encrypted(site_key, [first, second], [1.0, 3.0])
    assert clipped == 2
    # (1 * [0.5, 1, -1, 0.25] + 3 * [0.1, 0.2, 0.3, 0.4]) / 4
    expected = np.array([0.2, 0.4, -0.025, 0.3625])
    np.testing.assert_allclose(mean, expected, rtol=0, atol=bound)


def test_layout_packs_across_ciphertexts(site_key: FederationKey) -> None:
    slots = site_key.params.slots
    fits = Layout.of({"x": np.zeros(slots - 2)}, slots)
    spills = Layout.of({"x": np.zeros(slots - 1)}, slots)
    big = Layout.of({"a": np.zeros((3, slots)), "b": np.zeros(5, np.int64)}, slots)
    assert fits.chunk_sizes() == [slots]
    assert spills.chunk_sizes() == [slots, 1]
    assert big.num_ciphertexts == 4
    assert big.chunk_sizes() == [slots, slots, slots, 7]


def test_multi_tensor_layout_roundtrips() -> None:
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
              "n": np.array(4, np.int64), "b": np.array([-1.0], np.float32)}
    layout = Layout.of(params, 4)
    flat = layout.flatten(params)
    np.testing.assert_array_equal(flat, [0, 1, 2, 3, 4, 5, 4, -1])
    back = layout.unflatten(flat)
    assert back["w"].shape == (2, 3)
    assert back["n"].shape == ()
    np.testing.assert_array_equal(back["w"], params["w"])


def test_weight_above_max_weight_is_rejected(site_key: FederationKey) -> None:
    layout = Layout.of({"x": np.zeros(3)}, site_key.params.slots)
    with pytest.raises(Exception, match="must be in \\(0, 1000\\]"):
        encrypt_update(site_key, layout, "a", 1, {"x": np.zeros(3)}, 1001.0, "b0")


def test_nan_update_is_rejected_naming_tensor(site_key: FederationKey) -> None:
    layout = Layout.of({"x": np.zeros(3)}, site_key.params.slots)
    with pytest.raises(UpdateRejected) as error:
        encrypt_update(site_key, layout, "a", 1, {"x": np.array([0, np.nan, 0])},
                       1.0, "b0")
    assert error.value.site == "a"
    assert error.value.tensor == "x"


def test_update_wire_form_roundtrips(site_key: FederationKey) -> None:
    layout = Layout.of({"x": np.zeros(3)}, site_key.params.slots)
    encrypted, _ = encrypt_update(site_key, layout, "a", 2, {"x": np.ones(3)}, 2.0,
                                  "b0")
    assert EncryptedUpdate.from_params(encrypted.to_params()) == encrypted
