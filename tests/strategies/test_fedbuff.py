"""FedBuff: the asynchronous hooks, staleness weights and batch-norm buffers."""

import math

import numpy as np
import pytest

from prifed.core.messages import TrainReply
from prifed.core.strategy import FedAvg
from prifed.errors import ConfigError, UpdateRejected
from prifed.simclock import SiteProfile, SiteTimeline, run_async
from prifed.strategies import build_strategy
from prifed.strategies.base import state_from_bytes, state_to_bytes
from prifed.training.models import get_params, trainable_names
from prifed.transport.inprocess import InProcessTransport

from strategy_cases import tiny_sites

SCALAR = {"w": np.array([0.0], np.float32), "stat": np.array([0.0], np.float32),
          "count": np.array(0, np.int64)}


def answer(instruction, w, stat, count, num_samples=1):
    return TrainReply(instruction.site, instruction.server_round,
                      {"w": np.array([w], np.float32),
                       "stat": np.array([stat], np.float32),
                       "count": np.array(count, np.int64)}, num_samples)


def started(**options):
    strategy = build_strategy("fedbuff", **options)
    strategy.start(SCALAR, ["w"])
    return strategy


def test_batch_norm_statistics_follow_synchronous_path():
    sites = tiny_sites(num_sites=2)
    model = sites[0].model_factory()
    initial = get_params(model)
    fedbuff = build_strategy("fedbuff", buffer_size=2)
    fedbuff.start(initial, trainable_names(model))
    replies = []
    for site in sites:
        instruction, params = fedbuff.dispatch(site.name)
        replies.append(site.fit(params, instruction))
    assert fedbuff.submit(replies[0]) is None
    asynchronous = fedbuff.submit(replies[1])
    fedavg = FedAvg()
    fedavg.initialize(initial, trainable_names(model))
    synchronous = fedavg.aggregate_train(1, initial, replies)
    for name in ("layers.1.running_mean", "layers.1.running_var"):
        assert not np.allclose(asynchronous[name], initial[name]), name
        np.testing.assert_allclose(asynchronous[name], synchronous[name], rtol=1e-6)
    counter = "layers.1.num_batches_tracked"
    assert asynchronous[counter].dtype == np.int64
    assert int(asynchronous[counter]) == int(synchronous[counter]) > 0
    for name in initial:
        np.testing.assert_allclose(asynchronous[name], synchronous[name], rtol=1e-5,
                                   atol=1e-7)
    assert fedbuff.version == 1


def test_stale_reply_counts_less():
    strategy = started(buffer_size=1)
    first, _ = strategy.dispatch("a")
    second, _ = strategy.dispatch("b")
    # a arrives first (staleness 0): x = 0 + 1 * (1 - 0) = 1.
    new = strategy.submit(answer(first, 1.0, 4.0, 10))
    np.testing.assert_allclose(new["w"], [1.0])
    # b started from version 0 and arrives at version 1 (staleness 1), weight
    # 1 / sqrt(2): x = 1 + (2 - 0) / sqrt(2).
    new = strategy.submit(answer(second, 2.0, 8.0, 20))
    np.testing.assert_allclose(new["w"], [1.0 + 2.0 / math.sqrt(2.0)], rtol=1e-6)
    # A lone reply's buffers are its own values.
    np.testing.assert_allclose(new["stat"], [8.0])
    assert int(new["count"]) == 20
    assert strategy.last_applied["staleness"] == [1]


def test_buffer_of_two_weights_samples_and_staleness():
    strategy = started(buffer_size=2, server_lr=0.5)
    old, _ = strategy.dispatch("slow")
    fast, _ = strategy.dispatch("fast")
    strategy.submit(answer(fast, 1.0, 1.0, 1))
    fast, _ = strategy.dispatch("fast")
    assert strategy.submit(answer(fast, 3.0, 3.0, 3)) is not None  # version 1
    np.testing.assert_allclose(strategy.current["w"], [0.5 * 2.0])
    fast, _ = strategy.dispatch("fast")
    assert strategy.submit(answer(fast, 2.0, 2.0, 2, num_samples=3)) is None
    new = strategy.submit(answer(old, 5.0, 6.0, 9, num_samples=1))
    # By hand, from x = 1 at version 1:
    #   fast: staleness 0, weight 1, n 3, change 2 - 1 = 1
    #   slow: staleness 1, weight 1/sqrt(2), n 1, change 5 - 0 = 5
    #   x = 1 + 0.5 * (3 * 1 + 5 / sqrt(2)) / (3 + 1)
    #   stat = (3 * 2 + 6 / sqrt(2)) / (3 + 1 / sqrt(2))
    s = 1 / math.sqrt(2.0)
    np.testing.assert_allclose(new["w"], [1 + 0.5 * (3 + 5 * s) / 4], rtol=1e-6)
    np.testing.assert_allclose(new["stat"], [(6 + 6 * s) / (3 + s)], rtol=1e-6)
    assert int(new["count"]) == round((3 * 2 + 9 * s) / (3 + s))
    assert sorted(strategy.last_applied["staleness"]) == [0, 1]


def test_reply_checks_and_task_bookkeeping():
    strategy = started(buffer_size=5)
    instruction, _ = strategy.dispatch("a")
    with pytest.raises(UpdateRejected, match="no task outstanding"):
        strategy.submit(answer(instruction, 1.0, 1.0, 1).__class__(
            "b", 0, dict(SCALAR), 1))
    bad = answer(instruction, float("nan"), 1.0, 1)
    with pytest.raises(UpdateRejected, match="NaN"):
        strategy.submit(bad)
    assert "a" not in strategy.outstanding  # the task ended with the reply
    instruction, _ = strategy.dispatch("a")
    wrong = answer(instruction, 1.0, 1.0, 1)
    wrong.server_round = 7
    with pytest.raises(UpdateRejected, match="version 7"):
        strategy.submit(wrong)


def test_unused_model_versions_are_dropped():
    strategy = started(buffer_size=1)
    slow, _ = strategy.dispatch("slow")
    for step in range(5):
        instruction, _ = strategy.dispatch("fast")
        strategy.submit(answer(instruction, float(step), 0.0, 0))
    assert sorted(strategy.versions) == [0, 5]
    strategy.cancel("slow")
    assert sorted(strategy.versions) == [5]
    with pytest.raises(UpdateRejected):
        strategy.submit(answer(slow, 1.0, 0.0, 0))


def test_max_staleness_rejects_old_reply():
    strategy = started(buffer_size=1, max_staleness=1)
    slow, _ = strategy.dispatch("slow")
    for step in range(2):
        instruction, _ = strategy.dispatch("fast")
        strategy.submit(answer(instruction, float(step), 0.0, 0))
    with pytest.raises(UpdateRejected, match="staleness 2"):
        strategy.submit(answer(slow, 1.0, 0.0, 0))


def test_async_state_survives_save_and_restore():
    strategy = started(buffer_size=2)
    slow, _ = strategy.dispatch("slow")
    for step in range(3):
        instruction, _ = strategy.dispatch("fast")
        strategy.submit(answer(instruction, 0.5 * step, step, step))
    restored = build_strategy("fedbuff", buffer_size=2)
    restored.load_state_dict(state_from_bytes(state_to_bytes(strategy.state_dict())))
    assert restored.buffer.count == 1
    expected = strategy.submit(answer(slow, 2.0, 1.0, 3))
    got = restored.submit(answer(slow, 2.0, 1.0, 3))
    for name in SCALAR:
        np.testing.assert_array_equal(got[name], expected[name])
    assert restored.version == strategy.version == 2


def test_fedbuff_needs_start():
    with pytest.raises(ConfigError, match="start"):
        build_strategy("fedbuff").dispatch("a")


def test_async_run_with_slow_site_stays_finite():
    sites = tiny_sites(num_sites=3)
    model = sites[0].model_factory()
    local = {"local_steps": 4, "batch_size": 4, "lr": 0.05, "optimizer": "sgd"}
    timeline = SiteTimeline([s.name for s in sites],
                            {"site-2": SiteProfile(speed=0.1)}, step_seconds=1.0)
    strategy = build_strategy("fedbuff", buffer_size=2, local_config=local)
    final, history = run_async(strategy, InProcessTransport(sites), timeline,
                               get_params(model), trainable_names(model),
                               max_tasks=40)
    assert history[-1].tasks_done <= 40
    stale = [s for record in history for site, s in
             zip(record.sites, record.staleness, strict=True) if site == "site-2"]
    assert stale and min(stale) > 0
    times = [record.time for record in history]
    assert times == sorted(times)
    for value in final.values():
        if np.issubdtype(value.dtype, np.floating):
            assert np.isfinite(value).all()
    assert final["layers.1.num_batches_tracked"].dtype == np.int64
