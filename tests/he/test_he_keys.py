"""Key management: exports with and without the secret key, files, rotation."""

from __future__ import annotations

import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from prifed.errors import ConfigError
from prifed.he.combine import EncryptedSum
from prifed.he.errors import DecryptionError
from prifed.he.keys import (FederationKey, coordinator_context_bytes,
                            coordinator_key, load_key, read_key_file, rotate_key,
                            site_context_bytes, write_key_file)
from prifed.he.packing import Layout
from prifed.he.params import select_params
from prifed.he.site import decrypt_aggregate, encrypt_update


def encrypted_sum_of_ones(key: FederationKey) -> tuple[Layout, EncryptedSum]:
    layout = Layout.of({"x": np.zeros(5)}, key.params.slots)
    combiner = EncryptedSum(coordinator_key(key), layout, 1)
    update, _ = encrypt_update(key, layout, "a", 1, {"x": np.ones(5)}, 2.0, "b0")
    combiner.add(update)
    return layout, combiner


def test_coordinator_context_has_no_secret_key(site_key: FederationKey) -> None:
    context = ts.context_from(load_key(coordinator_context_bytes(site_key))
                              .context.serialize())
    assert not context.is_private()
    assert not context.has_secret_key()


def test_coordinator_cannot_decrypt_with_tenseal(site_key: FederationKey,
                                                 coord_key: FederationKey) -> None:
    _, combiner = encrypted_sum_of_ones(site_key)
    ciphertext = combiner.result().ciphertexts[0]
    vector = ts.ckks_vector_from(coord_key.context, ciphertext)
    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        vector.decrypt()


def test_coordinator_cannot_encrypt(coord_key: FederationKey) -> None:
    with pytest.raises(ValueError, match="doesn't support encryption"):
        ts.ckks_vector(coord_key.context, [1.0, 2.0])


def test_decrypt_without_secret_key_names_site(site_key: FederationKey,
                                               coord_key: FederationKey) -> None:
    layout, combiner = encrypted_sum_of_ones(site_key)
    with pytest.raises(DecryptionError) as error:
        decrypt_aggregate(coord_key, layout, "coordinator", combiner.result())
    assert error.value.site == "coordinator"
    assert "has no secret key" in str(error.value)


def test_site_context_decrypts_after_file_roundtrip(site_key: FederationKey,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "site.safetensors"
    write_key_file(path, site_context_bytes(site_key))
    loaded = read_key_file(path)
    layout, combiner = encrypted_sum_of_ones(site_key)
    decrypted = decrypt_aggregate(loaded, layout, "b", combiner.result())
    np.testing.assert_allclose(decrypted.mean["x"], np.ones(5), atol=1e-6)
    assert loaded.key_id == site_key.key_id
    assert loaded.params == site_key.params


def test_site_file_is_owner_only(site_key: FederationKey, tmp_path: Path) -> None:
    site_path = tmp_path / "site.safetensors"
    coordinator_path = tmp_path / "coordinator.safetensors"
    write_key_file(site_path, site_context_bytes(site_key))
    write_key_file(coordinator_path, coordinator_context_bytes(site_key))
    assert stat.S_IMODE(site_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(coordinator_path.stat().st_mode) == 0o644


def test_coordinator_context_cannot_export_site_context(
        coord_key: FederationKey) -> None:
    with pytest.raises(ConfigError, match="has no secret key"):
        site_context_bytes(coord_key)


def test_coordinator_rejects_secret_context(site_key: FederationKey) -> None:
    layout = Layout.of({"x": np.zeros(5)}, site_key.params.slots)
    with pytest.raises(ConfigError, match="contains the secret key"):
        EncryptedSum(site_key, layout, 1)


def test_rotation_makes_a_new_key(site_key: FederationKey) -> None:
    rotated = rotate_key(site_key, run="run-2")
    assert rotated.key_id != site_key.key_id
    assert rotated.previous_key_id == site_key.key_id
    assert rotated.params == site_key.params
    assert rotated.run == "run-2"
    # The new secret key differs: the old key cannot read the new sum.
    layout, combiner = encrypted_sum_of_ones(rotated)
    with pytest.raises(DecryptionError, match="aggregate is under key"):
        decrypt_aggregate(site_key, layout, "a", combiner.result())


def test_kind_mismatch_is_detected(site_key: FederationKey) -> None:
    data = bytearray(site_context_bytes(site_key))
    # Relabel the secret file as a coordinator file: same length, other kind.
    index = data.index(b'"kind":"site"')
    data[index:index + 13] = b'"kind":"xxxx"'
    with pytest.raises(ConfigError, match="filed as a 'xxxx' context but contains"):
        load_key(bytes(data))


def test_garbage_file_is_config_error() -> None:
    with pytest.raises(ConfigError, match="not a PriFed CKKS context file"):
        load_key(b"not a context", source="x.safetensors")


def test_context_must_match_its_parameters(site_key: FederationKey) -> None:
    other = select_params(4, 1.0, 1e-4, 1000.0)
    assert other.scale_bits != site_key.params.scale_bits
    mislabelled = replace(site_key, params=other)
    with pytest.raises(ConfigError, match="but its metadata says"):
        load_key(coordinator_context_bytes(mislabelled))
