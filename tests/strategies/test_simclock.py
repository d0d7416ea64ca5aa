"""Simulated time: site speeds, availability and synchronous rounds."""

import numpy as np
import pytest

from prifed.core.engine import RoundEngine
from prifed.errors import ConfigError
from prifed.simclock import (SiteProfile, SiteTimeline, TimedTransport, run_async,
                             time_to_target)
from prifed.strategies import build_strategy
from prifed.training.models import get_params, trainable_names
from prifed.transport.inprocess import InProcessTransport

from strategy_cases import tiny_sites

LOCAL = {"local_steps": 4, "batch_size": 4, "lr": 0.05, "optimizer": "sgd"}


def test_duration_scales_with_speed():
    timeline = SiteTimeline(["a", "b"], {"b": SiteProfile(speed=0.1)},
                            step_seconds=0.5)
    assert timeline.duration("a", 10) == pytest.approx(5.0)
    assert timeline.duration("b", 10) == pytest.approx(50.0)


def test_availability_share_and_determinism():
    timeline = SiteTimeline(["a"], {"a": SiteProfile(availability=0.5)}, seed=3)
    online = [timeline.is_online("a", float(t)) for t in range(2000)]
    assert 0.45 < np.mean(online) < 0.55
    again = SiteTimeline(["a"], {"a": SiteProfile(availability=0.5)}, seed=3)
    assert online == [again.is_online("a", float(t)) for t in range(2000)]
    start = timeline.next_online("a", 0.0)
    assert timeline.is_online("a", start)
    assert all(not timeline.is_online("a", float(t)) for t in range(int(start)))


def test_unknown_site_profile_is_rejected():
    with pytest.raises(ConfigError, match="unknown site 'z'"):
        SiteTimeline(["a"], {"z": SiteProfile()})


def test_synchronous_round_waits_for_slowest_site():
    sites = tiny_sites(model="logreg")
    timeline = SiteTimeline([s.name for s in sites],
                            {"site-1": SiteProfile(speed=0.1)}, step_seconds=1.0)
    transport = TimedTransport(InProcessTransport(sites), timeline)
    model = sites[0].model_factory()
    engine = RoundEngine(build_strategy("fedavg", local_config=LOCAL), transport,
                         num_rounds=3, evaluate_every=3)
    engine.run(get_params(model), trainable_names(model))
    # Each round lasts the slow site's 4 steps at 10 s per step.
    assert transport.clock.now == pytest.approx(3 * 40.0)
    assert len(engine.history[-1].eval_metrics) == 3


def test_offline_site_skips_rounds():
    sites = tiny_sites(model="logreg")
    timeline = SiteTimeline([s.name for s in sites],
                            {"site-0": SiteProfile(availability=0.3)},
                            step_seconds=1.0, window_seconds=4.0, seed=5)
    transport = TimedTransport(InProcessTransport(sites), timeline)
    model = sites[0].model_factory()
    engine = RoundEngine(build_strategy("fedavg", local_config=LOCAL), transport,
                         num_rounds=20, evaluate_every=20)
    engine.run(get_params(model), trainable_names(model))
    joined = sum("site-0" in record.sites for record in engine.history)
    assert 0 < joined < 20
    assert all("site-1" in record.sites for record in engine.history)


def test_async_updates_sooner_with_a_slow_site():
    def server_updates_by(asynchronous, deadline):
        sites = tiny_sites(model="logreg")
        timeline = SiteTimeline([s.name for s in sites],
                                {"site-2": SiteProfile(speed=0.1)}, step_seconds=1.0)
        model = sites[0].model_factory()
        if asynchronous:
            strategy = build_strategy("fedbuff", buffer_size=2, local_config=LOCAL)
            _, history = run_async(strategy, InProcessTransport(sites), timeline,
                                   get_params(model), trainable_names(model), 30)
            return sum(record.time <= deadline for record in history)
        transport = TimedTransport(InProcessTransport(sites), timeline)
        engine = RoundEngine(build_strategy("fedavg", local_config=LOCAL), transport,
                             num_rounds=3, evaluate_every=3)
        engine.run(get_params(model), trainable_names(model))
        return int(transport.clock.now <= deadline) * 3

    # Synchronous: 3 rounds of 40 s. Asynchronous: the two fast sites finish a
    # task every 4 s, so a buffer of 2 fills every 4 s.
    assert server_updates_by(False, 120.0) == 3
    assert server_updates_by(True, 40.0) >= 9


def test_time_to_target():
    assert time_to_target([1.0, 2.0, 3.0], [0.5, 0.8, 0.9], 0.8) == 2.0
    assert time_to_target([1.0, 2.0], [0.5, 0.6], 0.8) is None
