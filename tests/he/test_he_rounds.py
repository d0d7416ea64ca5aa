"""Rounds at the sites: decrypt, step the optimiser, train, encrypt."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from he_cases import plain_weighted_mean

from prifed.core.params import ParameterSet
from prifed.errors import ProtocolError
from prifed.he.combine import EncryptedSum
from prifed.he.keys import FederationKey, load_key, site_context_bytes
from prifed.he.optim import FedAdam, build_server_optimizer
from prifed.he.packing import EncryptedAggregate, Layout
from prifed.he.site import HESite

WEIGHTS = [200, 30, 85]
TARGETS = [0.3, -0.2, 0.1]


def local_training(model: Mapping[str, np.ndarray], target: float) -> ParameterSet:
    """A deterministic stand-in for local SGD: move 10% towards a target."""
    return {name: (0.9 * value + 0.1 * target).astype(value.dtype)
            for name, value in model.items()}


def initial_model() -> ParameterSet:
    return {"w": np.linspace(-0.5, 0.5, 13, dtype=np.float32).reshape(13, 1),
            "b": np.zeros(1, np.float32)}


def run_encrypted(key: FederationKey, coord: FederationKey, optimizer: str,
                  rounds: int) -> list[HESite]:
    sites = [HESite(f"site-{i}", load_key(site_context_bytes(key)),
                    build_server_optimizer(optimizer, server_lr=0.05, tau=1e-2)
                    if optimizer != "fedavg" else None)
             for i in range(len(WEIGHTS))]
    relay: ParameterSet = initial_model()
    for server_round in range(1, rounds + 1):
        layout = Layout.of(initial_model(), key.params.slots)
        combiner = EncryptedSum(coord, layout, server_round)
        for site, weight, target in zip(sites, WEIGHTS, TARGETS, strict=True):
            model = site.receive(relay)
            update = site.encrypt(local_training(model, target), weight, server_round)
            combiner.add_params(site.name, update.to_params())
        relay = combiner.result().to_params()
    for site in sites:
        site.receive(relay)
    return sites


def run_plain(optimizer: str, rounds: int) -> ParameterSet:
    opt = build_server_optimizer(optimizer, server_lr=0.05, tau=1e-2) \
        if optimizer != "fedavg" else build_server_optimizer("fedavg")
    model = initial_model()
    for _ in range(rounds):
        locals_ = [local_training(model, t) for t in TARGETS]
        mean = {name: plain_weighted_mean(
            [loc[name].astype(np.float64) - model[name] for loc in locals_], WEIGHTS)
            for name in model}
        model = opt.step(model, mean, set(model))
    return model


@pytest.mark.parametrize("optimizer", ["fedavg", "fedadam", "fedyogi", "fedadagrad"])
def test_every_site_ends_with_the_plain_model(site_key: FederationKey,
                                              coord_key: FederationKey,
                                              optimizer: str) -> None:
    sites = run_encrypted(site_key, coord_key, optimizer, rounds=3)
    plain = run_plain(optimizer, rounds=3)
    for site in sites:
        assert site.applied_round == 3
        for name in plain:
            assert site.model is not None
            assert site.model[name].dtype == np.float32
            # Decryption is deterministic, so every site has the same bits.
            np.testing.assert_array_equal(site.model[name], sites[0].model[name])
            np.testing.assert_allclose(site.model[name], plain[name], rtol=0,
                                       atol=1e-6)


def test_repeated_aggregate_is_applied_once(site_key: FederationKey,
                                            coord_key: FederationKey) -> None:
    site = HESite("a", site_key, FedAdam(server_lr=0.05, tau=1e-2))
    model = site.receive(initial_model())
    layout = Layout.of(model, site_key.params.slots)
    combiner = EncryptedSum(coord_key, layout, 1)
    combiner.add(site.encrypt(local_training(model, 0.3), 10.0, 1))
    relay = combiner.result().to_params()
    once = site.receive(relay)
    twice = site.receive(relay)
    assert once is twice
    assert site.optimizer.steps == 1  # type: ignore[attr-defined]


def test_missed_aggregate_is_detected(site_key: FederationKey,
                                      coord_key: FederationKey) -> None:
    behind = HESite("behind", site_key)
    ahead = HESite("ahead", site_key)
    for site in (behind, ahead):
        site.receive(initial_model())
    layout = Layout.of(initial_model(), site_key.params.slots)
    relay = None
    for server_round in (1, 2):
        combiner = EncryptedSum(coord_key, layout, server_round)
        combiner.add(ahead.encrypt(local_training(ahead.model or {}, 0.3), 5.0,
                                   server_round))
        aggregate = combiner.result()
        ahead.apply(aggregate)
        relay = aggregate
    assert isinstance(relay, EncryptedAggregate)
    with pytest.raises(ProtocolError, match="the site missed an aggregate"):
        behind.apply(relay)


def test_clear_model_after_start_is_rejected(site_key: FederationKey) -> None:
    site = HESite("a", site_key)
    site.receive(initial_model())
    changed = initial_model()
    changed["b"] = np.ones(1, np.float32)
    with pytest.raises(ProtocolError, match="sent a different model in the clear"):
        site.receive(changed)


def test_site_state_roundtrip(site_key: FederationKey,
                              coord_key: FederationKey) -> None:
    sites = run_encrypted(site_key, coord_key, "fedyogi", rounds=2)
    optimizer = build_server_optimizer("fedyogi", server_lr=0.05, tau=1e-2)
    restored = HESite("copy", site_key, optimizer)
    restored.load_state_dict(sites[0].state_dict())
    assert restored.applied_round == 2
    assert restored.digest == sites[0].digest
    assert list(restored.model or {}) == ["w", "b"]
