"""A deployed CKKS run of the four heart sites against `prifed simulate --homomorphic`.

The coordinator holds only the context without the secret key, so every model
version after the public initial one is a ciphertext on its disk. The sites
decrypt the last aggregate and save the same model, which matches the
simulated encrypted run and the plain run within the CKKS error.
"""

from __future__ import annotations

import numpy as np
import pytest
from deploy_harness import Federation, he_federation

from prifed.core.params import params_from_bytes
from prifed.he.packing import is_encrypted
from prifed.he.params import HomomorphicSettings

ROUNDS, STEPS, LR = 2, 20, 0.01
TOLERANCE = 1e-5
"""Largest difference per weight: two rounds of means with error at most 1e-6."""


def simulated_homomorphic() -> dict[str, np.ndarray]:
    """Return the model of ``prifed simulate --homomorphic`` with the same settings."""
    from prifed.simulation import SimulationConfig, run_simulation

    config = SimulationConfig(model="logreg", strategy="fedavg", rounds=ROUNDS,
                              local_steps=STEPS, batch_size=4, lr=LR,
                              optimizer="sgd", standardize="federated",
                              test_fraction=0.34, seed=42, baselines=False,
                              homomorphic=HomomorphicSettings())
    return run_simulation(config).model


@pytest.fixture(scope="module")
def he_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("homomorphic")
    fed = he_federation(root, rounds=ROUNDS, local_steps=STEPS, lr=LR)
    try:
        fed.start_coordinator()
        sites = [fed.start_site(site, ["--he-key", str(root / "site.ctx"),
                                       "--threads", "1"]) for site in fed.sites]
        code = fed.wait_coordinator(180)
        site_codes = [process.wait(60) for process in sites]
        yield fed, code, site_codes
    finally:
        fed.close()


def site_model(fed: Federation, site: str) -> dict[str, np.ndarray]:
    path = fed.site_dir(site) / "final_model.safetensors"
    return params_from_bytes(path.read_bytes())


def test_sites_agree_on_decrypted_model(he_run):
    fed, code, site_codes = he_run
    assert code == 0, fed.output("coordinator")[-3000:]
    assert site_codes == [0, 0, 0, 0]
    first = site_model(fed, fed.sites[0])
    for site in fed.sites[1:]:
        model = site_model(fed, site)
        for name, value in first.items():
            assert np.array_equal(model[name], value), (site, name)


def test_model_matches_simulations(he_run, simulated):
    fed, _, _ = he_run
    deployed = site_model(fed, fed.sites[0])
    for reference in (simulated_homomorphic(), simulated(ROUNDS, STEPS, LR)):
        assert sorted(deployed) == sorted(reference)
        for name, value in reference.items():
            assert np.max(np.abs(deployed[name] - value)) < TOLERANCE, name


def test_coordinator_holds_only_ciphertexts(he_run):
    fed, _, _ = he_run
    final = fed.final_model()
    assert is_encrypted(final)
    clear = site_model(fed, fed.sites[0])
    assert not set(final) & set(clear)
    folder = fed.state_dir / "models"
    for version in range(1, ROUNDS + 1):
        data = (folder / f"model-{version:04d}.safetensors").read_bytes()
        assert is_encrypted(params_from_bytes(data)), version
    assert not is_encrypted(params_from_bytes(
        (folder / "model-0000.safetensors").read_bytes()))
