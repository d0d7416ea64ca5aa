"""DP runs on the heart sites: spend per site and federation, secure aggregation."""

import json

import numpy as np
import pytest

from prifed.core.secure_sum import PrivateSum
from prifed.core.strategy import FedAvg
from prifed.errors import ConfigError, NotSupportedError
from prifed.privacy.accountant import GaussianEvent, compute_epsilon
from prifed.privacy.errors import UnsupportedLayerError
from prifed.privacy.federation import PrivacyOptions, privacy_summary, run_private
from prifed.privacy.ledger import PrivacyLedger
from prifed.privacy.policy import LEDGER_FILE
from prifed.privacy.settings import DPSettings
from prifed.privacy.strategy import PrivateStrategy
from prifed.sitedata import prepare_sites
from prifed.strategies import build_strategy
from prifed.training.models import build_model

TRAINING = {"local_steps": 10, "batch_size": 4, "lr": 0.01, "optimizer": "sgd"}


@pytest.fixture(scope="module")
def sites():
    return prepare_sites(None, None, 42)


def factory(name="logreg"):
    return lambda: build_model(name, 13, 42)


def run(sites, tmp_path, mode="record", rounds=2, secure="off", model="logreg",
        **options):
    values = {"noise_multiplier": 1.5, "delta": 1e-3} | options
    privacy = PrivacyOptions(mode=mode, site_root=str(tmp_path), **values)
    privacy.validate()
    return run_private(FedAvg(local_config=TRAINING), sites, factory(model), rounds,
                       7, privacy, secure), privacy


def test_record_level_spend_per_site_and_federation(sites, tmp_path):
    result, privacy = run(sites, tmp_path)
    summary = privacy_summary(result.history, privacy)
    expected = {s.name: compute_epsilon([GaussianEvent(1.5, 4 / s.train_y.size, 10)]
                                        * 2, 1e-3) for s in sites}
    for name, epsilon in expected.items():
        assert summary["per_site"][name]["epsilon"] == pytest.approx(epsilon, rel=1e-5)
        assert summary["per_site"][name]["rounds_trained"] == 2
    # Each record lives at one site, so the federation spends the most any site does.
    assert summary["federation"]["epsilon"] == pytest.approx(max(expected.values()),
                                                             rel=1e-5)
    assert max(expected, key=expected.get) == "Switzerland"
    assert summary["federation"]["delta"] == 1e-3
    json.dumps(summary, allow_nan=False)


def test_target_epsilon_is_reached_at_planned_rounds(sites, tmp_path):
    result, privacy = run(sites, tmp_path, rounds=3, noise_multiplier=None,
                          epsilon=2.0)
    summary = privacy_summary(result.history, privacy)
    for name, entry in summary["per_site"].items():
        assert entry["epsilon"] <= 2.0
        assert entry["epsilon"] == pytest.approx(2.0, rel=0.01), name


def test_ledgers_live_in_site_folders(sites, tmp_path):
    run(sites, tmp_path)
    ledger = PrivacyLedger(tmp_path / "VA_Long_Beach" / LEDGER_FILE, "VA Long Beach")
    assert [e.server_round for e in ledger.entries()] == [1, 2]
    assert (tmp_path / "VA_Long_Beach" / "privacy-policy.json").is_file()


def test_batch_norm_model_fails_before_first_round(sites, tmp_path):
    with pytest.raises(UnsupportedLayerError, match="layer 'layers.1'"):
        run(sites, tmp_path, model="bn-mlp")
    assert not list(tmp_path.iterdir())


def test_site_level_with_secure_aggregation(sites, tmp_path):
    result, privacy = run(sites, tmp_path, mode="site", secure="secagg",
                          clip_norm=0.05, noise_multiplier=2.0)
    assert result.strategy.settings.noise_placement == "sites"
    assert result.strategy.settings.min_sites == 4
    summary = privacy_summary(result.history, privacy)
    assert "secure aggregation" in summary["trust"]
    expected = compute_epsilon([GaussianEvent(2.0, 1.0, 1)] * 2, 1e-3)
    assert summary["federation"]["epsilon"] == pytest.approx(expected, rel=1e-5)
    ledger = PrivacyLedger(tmp_path / "Hungary" / LEDGER_FILE, "Hungary")
    assert {e.noise_placement for e in ledger.entries()} == {"sites"}
    assert all(np.isfinite(v).all() for v in result.model.values())


def test_coordinator_noise_is_the_weaker_trust(sites, tmp_path):
    result, privacy = run(sites, tmp_path, mode="site", rounds=1, clip_norm=0.05)
    summary = privacy_summary(result.history, privacy)
    assert "weaker trust assumption" in summary["trust"]


def test_sum_over_too_few_sites_is_not_used():
    strategy = PrivateStrategy(FedAvg(), DPSettings(
        "site", noise_multiplier=1.0, noise_placement="sites", min_sites=3))
    params = {"w": np.zeros(3, np.float32)}
    two = PrivateSum({"w": np.ones(3)}, 2.0, ("a", "b"))
    three = PrivateSum({"w": np.full(3, 3.0)}, 3.0, ("a", "b", "c"))
    assert strategy.aggregate_sum(1, params, two) is None
    np.testing.assert_allclose(strategy.aggregate_sum(1, params, three)["w"], 1.0)


def test_coordinator_noises_a_private_sum():
    strategy = PrivateStrategy(FedAvg(), DPSettings("site", noise_multiplier=2.0,
                                                    clip_norm=0.5), seed=4)
    params = {"w": np.zeros(5000, np.float32)}
    total = PrivateSum({"w": np.zeros(5000)}, 4.0, ("a", "b", "c", "d"))
    noisy = strategy.aggregate_sum(1, params, total)["w"]
    assert np.std(noisy) == pytest.approx(2.0 * 0.5 / 4, rel=0.05)


def test_options_are_checked_up_front(tmp_path):
    with pytest.raises(ConfigError, match="dp must be one of off, record, site"):
        PrivacyOptions(mode="sites", site_root=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match="exactly one of target epsilon"):
        PrivacyOptions(mode="record", site_root=str(tmp_path)).validate()
    with pytest.raises(ConfigError, match="site_root"):
        PrivacyOptions(mode="record", epsilon=1.0).validate()


def test_strategies_sites_cannot_apply_are_refused(sites, tmp_path):
    privacy = PrivacyOptions(mode="record", epsilon=1.0, delta=1e-3,
                             site_root=str(tmp_path))
    for name, message in [("fedprox", "config key 'proximal_mu'"),
                          ("scaffold", "needs individual updates"),
                          ("fedbuff", "asynchronous")]:
        strategy = build_strategy(name, local_config=TRAINING)
        with pytest.raises(NotSupportedError, match=message):
            run_private(strategy, sites, factory(), 1, 7, privacy)
    # Nothing started: no site folder was written.
    assert not list(tmp_path.iterdir())


def test_server_optimiser_runs_under_dp(sites, tmp_path):
    privacy = PrivacyOptions(mode="site", noise_multiplier=1.0, delta=1e-3,
                             site_root=str(tmp_path))
    result = run_private(build_strategy("fedadam", local_config=TRAINING), sites,
                         factory(), 1, 7, privacy)
    assert result.label == "fedadam+dp-site"
    assert sorted(result.history[0].accepted) == sorted(s.name for s in sites)


def test_summary_reads_infinity_sent_as_null(tmp_path):
    from prifed.core.engine import RoundRecord

    record = RoundRecord(1, ["a", "b"], accepted=["a", "b"])
    base = {"dp_delta": 1e-3, "dp_noise_multiplier": 0.0, "dp_sample_rate": 0.1,
            "dp_epsilon_limit": None}
    record.train_metrics = {"a": base | {"dp_epsilon": None},
                            "b": base | {"dp_epsilon": 2.5}}
    summary = privacy_summary([record], PrivacyOptions(
        mode="record", noise_multiplier=0.0, site_root=str(tmp_path)))
    assert summary["per_site"]["a"]["epsilon"] == "inf"
    assert summary["per_site"]["b"]["epsilon"] == 2.5
    assert summary["federation"]["epsilon"] == "inf"
    json.dumps(summary, allow_nan=False)
