"""CKKS behind the private-sum interface, with messages packed for the wire."""

from __future__ import annotations

import numpy as np
import pytest
from he_cases import plain_weighted_mean

from prifed.core.secure_sum import MessageRejected, pack_message, unpack_message
from prifed.errors import ConfigError, NotSupportedError
from prifed.he.backend import CKKSBackend
from prifed.he.keys import FederationKey
from prifed.he.packing import Layout
from prifed.he.site import decrypt_aggregate


def test_round_through_private_sum_interface(site_key: FederationKey,
                                             coord_key: FederationKey) -> None:
    reference = {"w": np.zeros(20, np.float32)}
    models = {"a": np.full(20, 0.2, np.float32), "b": np.full(20, -0.1, np.float32),
              "c": np.linspace(0, 1, 20, dtype=np.float32)}
    samples = {"a": 10, "b": 30, "c": 60}
    coordinator, site_backend = CKKSBackend(coord_key), CKKSBackend(site_key)
    coordinator.check(3, reference)
    combiner = coordinator.combiner(1, list(models), reference)
    encoders = {s: site_backend.site_encoder(s, 1, reference, {"w": m}, samples[s])
                for s, m in models.items()}

    for site, request in combiner.start().items():
        reply = encoders[site].handle(unpack_message(pack_message(request)))
        assert reply is not None
        combiner.receive(site, unpack_message(pack_message(reply)))
    assert combiner.close_phase() == {}

    with pytest.raises(NotSupportedError, match="stays encrypted"):
        combiner.result()
    aggregate = combiner.sealed_result()
    layout = Layout.of(reference, site_key.params.slots)
    mean = decrypt_aggregate(site_key, layout, "a", aggregate).mean["w"]
    expected = plain_weighted_mean(list(models.values()), list(samples.values()))
    np.testing.assert_allclose(mean, expected, atol=1e-6)


def test_rejected_reply_names_site(site_key: FederationKey,
                                   coord_key: FederationKey) -> None:
    reference = {"w": np.zeros(4, np.float32)}
    combiner = CKKSBackend(coord_key).combiner(1, ["a", "b"], reference)
    combiner.start()
    with pytest.raises(MessageRejected) as error:
        combiner.receive("a", {"phase": "ckks-ciphertexts", "round": 1})
    assert error.value.site == "a"
    combiner.close_phase()
    assert combiner.dropped == {"a": "field 'site' must be a string",
                                "b": "no reply"}


def test_check_rejects_too_many_sites(coord_key: FederationKey) -> None:
    with pytest.raises(ConfigError, match="prifed he keygen --sites 9"):
        CKKSBackend(coord_key).check(9, {})
