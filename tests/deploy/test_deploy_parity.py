"""A deployed four-site run on 127.0.0.1 against ``prifed simulate``, same seed."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from deploy_harness import Federation

from prifed.core.params import params_from_bytes

ROUNDS, STEPS, LR = 2, 20, 0.01


@pytest.fixture(scope="module")
def parity_run(tmp_path_factory):
    fed = Federation.create(tmp_path_factory.mktemp("parity"), rounds=ROUNDS,
                            local_steps=STEPS, lr=LR, keep_updates=True)
    try:
        fed.start_coordinator()
        sites = [fed.start_site(site) for site in fed.sites]
        code = fed.wait_coordinator()
        site_codes = [process.wait(60) for process in sites]
        yield fed, code, site_codes
    finally:
        fed.close()


def test_deployed_model_equals_simulated_bit_for_bit(parity_run, simulated):
    fed, code, _ = parity_run
    assert code == 0, fed.output("coordinator")[-3000:]
    deployed = fed.final_model()
    reference = simulated(ROUNDS, STEPS, LR)
    assert sorted(deployed) == sorted(reference)
    for name, value in reference.items():
        assert deployed[name].dtype == value.dtype
        assert np.array_equal(deployed[name], value), name


def test_sites_exit_with_the_final_model(parity_run):
    fed, _, site_codes = parity_run
    assert site_codes == [0, 0, 0, 0]
    coordinator_model = fed.final_model()
    for site in fed.sites:
        path = fed.site_dir(site) / "final_model.safetensors"
        saved = params_from_bytes(path.read_bytes())
        for name, value in coordinator_model.items():
            assert np.array_equal(saved[name], value), (site, name)


def test_summary_lists_every_round_and_site(parity_run):
    fed, _, _ = parity_run
    summary = json.loads((fed.state_dir / "summary.json").read_text())
    assert [r["server_round"] for r in summary["rounds"]] == [1, 2]
    for record in summary["rounds"]:
        assert record["accepted"] == fed.sites
        assert record["failures"] == {}
        assert sorted(record["eval_metrics"]) == sorted(fed.sites)
    # Switzerland's test set has one class, so its AUC is undefined: null.
    assert summary["final"]["per_site"]["Switzerland"]["auc"] is None


def test_updates_travel_zstd_compressed(parity_run):
    fed, _, _ = parity_run
    stored = sorted((fed.state_dir / "updates").rglob("*.safetensors.zst"))
    assert len(stored) == ROUNDS * len(fed.sites)
    for path in stored:
        assert path.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"


def test_logs_hold_no_token_or_key(parity_run):
    fed, _, _ = parity_run
    texts = [fed.log_file.read_text(), fed.output("coordinator")]
    for site in fed.sites:
        texts.append(fed.output(f"site-{site.replace(' ', '_')}"))
        texts.append((fed.site_dir(site) / "agent.log").read_text())
    secrets = list(fed.tokens.values())
    secrets += [(fed.site_dir(s) / "site.key").read_text().splitlines()[1]
                for s in fed.sites]
    secrets.append((fed.config.pki_dir / "coordinator.key").read_text()
                   .splitlines()[1])
    for text in texts:
        assert "join: site" in texts[0]
        for secret in secrets:
            assert secret not in text


@pytest.fixture(scope="module")
def batch_norm_run(tmp_path_factory):
    fed = Federation.create(tmp_path_factory.mktemp("parity-bn"), rounds=ROUNDS,
                            local_steps=STEPS, lr=LR, model="bn-mlp")
    try:
        fed.start_coordinator()
        threads = [threading.Thread(target=fed.agent(site).run, daemon=True)
                   for site in fed.sites]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(240)
        yield fed, fed.wait_coordinator()
    finally:
        fed.close()


def test_batch_norm_model_equals_simulated(batch_norm_run, simulated):
    fed, code = batch_norm_run
    assert code == 0, fed.output("coordinator")[-3000:]
    deployed = fed.final_model()
    reference = simulated(ROUNDS, STEPS, LR, "fedavg", "bn-mlp")
    counters = [name for name in reference if name.endswith("num_batches_tracked")]
    assert counters
    for name in counters:
        # A 0-d integer counter must travel as 0-d both ways, or every update
        # of a batch-norm model is rejected for its shape.
        assert deployed[name].shape == ()
        assert deployed[name].dtype == np.int64
        assert int(deployed[name]) == ROUNDS * STEPS
    for name, value in reference.items():
        assert np.array_equal(deployed[name], value), name
