"""Site-level DP: clipping of updates, coordinator noise and sites' noise shares."""

import math

import numpy as np
import pytest

from prifed.core.messages import TrainReply
from prifed.core.strategy import FedAvg, PlainMean
from prifed.errors import NotSupportedError
from prifed.privacy.settings import DPSettings
from prifed.privacy.sitelevel import NoisyMean, add_noise_share, clip_update, \
    noise_share_std, secagg_value_bound, update_norm
from prifed.privacy.strategy import PrivateStrategy


def reference(size=4000):
    return {"w": np.zeros(size, np.float32), "b": np.zeros(2, np.float32),
            "count": np.array(7, np.int64)}


def update(delta_w, delta_b, count=9):
    return {"w": np.asarray(delta_w, np.float32), "b": np.asarray(delta_b, np.float32),
            "count": np.array(count, np.int64)}


def test_clip_scales_delta_to_bound():
    ref = reference(2)
    clipped, norm = clip_update(update([3, 0], [0, 4]), ref, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["w"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [0.0, 0.8], rtol=1e-6)
    assert update_norm(clipped, ref) == pytest.approx(1.0, rel=1e-6)
    # Integer tensors never leave the site: they keep the global values.
    assert clipped["count"] == 7


def test_clip_keeps_small_delta():
    ref = reference(2)
    clipped, norm = clip_update(update([0.3, 0], [0, 0.4]), ref, 1.0)
    assert norm == pytest.approx(0.5)
    np.testing.assert_allclose(clipped["w"], [0.3, 0.0], rtol=1e-6)


def test_noisy_mean_adds_calibrated_noise():
    ref = reference()
    sigma, clip, sites = 2.0, 0.5, 4
    mean = NoisyMean(PlainMean(ref), ref, sigma, clip, np.random.default_rng(3))
    for i in range(sites):
        delta = np.full(4000, 10.0 if i == 0 else 0.0)
        # A site that did not clip is clipped by the coordinator.
        mean.add(TrainReply(f"s{i}", 1, update(delta, [0, 0]), 120 + i))
    result = mean.result()
    assert mean.count == sites
    assert mean.total_weight == sites
    clean = 0.5 / math.sqrt(4000) / sites
    noise = result["w"].astype(np.float64) - clean
    assert np.std(noise) == pytest.approx(sigma * clip / sites, rel=0.05)
    assert abs(np.mean(noise)) < 4 * sigma * clip / sites / math.sqrt(4000)


def test_noise_shares_sum_to_calibrated_noise():
    ref = reference()
    sigma, clip, min_sites = 3.0, 0.2, 5
    rng = np.random.default_rng(11)
    total = np.zeros(4000)
    for _ in range(min_sites):
        share = add_noise_share(ref, sigma, clip, min_sites, rng)
        total += share["w"]
        assert share["count"] == 7
    assert noise_share_std(sigma, clip, min_sites) == pytest.approx(
        sigma * clip / math.sqrt(min_sites))
    assert np.std(total) == pytest.approx(sigma * clip, rel=0.05)


def test_secagg_bound_covers_six_share_deviations():
    assert secagg_value_bound(2.0, 0.5, 4) == pytest.approx(0.5 + 6 * 0.5)


def test_strategy_adds_settings_to_every_instruction():
    strategy = PrivateStrategy(FedAvg(local_config={"local_steps": 5}),
                               DPSettings("site", 1e-3, target_epsilon=2.0,
                                          planned_rounds=10), seed=0)
    params = reference(3)
    instructions = strategy.configure_train(1, params, ["a", "b"],
                                            np.random.default_rng(0))
    assert [i.site for i in instructions] == ["a", "b"]
    dp = instructions[0].config["dp"]
    assert instructions[0].config["local_steps"] == 5
    assert dp["mode"] == "site"
    assert dp["target_epsilon"] is None
    assert dp["noise_multiplier"] > 1


def test_strategy_noises_only_without_secure_aggregation():
    params = reference(3)
    coordinator = PrivateStrategy(FedAvg(), DPSettings("site", noise_multiplier=1.0))
    shares = PrivateStrategy(FedAvg(), DPSettings(
        "site", noise_multiplier=1.0, noise_placement="sites", min_sites=3))
    record = PrivateStrategy(FedAvg(), DPSettings("record", noise_multiplier=1.0))
    assert isinstance(coordinator.begin_aggregation(1, params), NoisyMean)
    assert isinstance(shares.begin_aggregation(1, params), PlainMean)
    assert isinstance(record.begin_aggregation(1, params), PlainMean)


def test_strategy_needing_individual_updates_is_refused():
    class Median(FedAvg):
        name = "median"
        needs_individual_updates = True

    with pytest.raises(NotSupportedError, match="needs individual updates"):
        PrivateStrategy(Median(), DPSettings("site", noise_multiplier=1.0))
