"""Comparing strategies in one simulate call: same splits, same seeds, one table."""

import json

import numpy as np
import pytest

from prifed import cli
from prifed.errors import ConfigError
from prifed.simclock import SiteProfile
from prifed.simulation import SimulationConfig, run_simulation
from prifed.strategies import parse_strategy_specs

FAST = dict(rounds=2, local_steps=10, baselines=False)


def test_strategies_share_splits_and_seeds():
    both = run_simulation(SimulationConfig(strategy="fedavg,fedyogi:server_lr=0.05",
                                           **FAST))
    alone = run_simulation(SimulationConfig(strategy="fedavg", **FAST))
    assert [m.method for m in both.methods] == ["fedavg", "fedyogi(server_lr=0.05)"]
    for name in alone.model:
        np.testing.assert_array_equal(both.models["fedavg"][name], alone.model[name])
    for together, single in zip(both.methods[0].curve, alone.methods[0].curve,
                                strict=True):
        for site, metrics in single.items():
            assert together[site]["accuracy"] == metrics["accuracy"]
            assert together[site]["loss"] == metrics["loss"]
    assert not np.allclose(both.models["fedyogi(server_lr=0.05)"]["linear.weight"],
                           alone.model["linear.weight"])


def test_personalised_row_and_async_time():
    result = run_simulation(SimulationConfig(
        strategy="fedavg,fedbuff", personal_layers=["linear.bias"], finetune_steps=5,
        site_profiles={"Switzerland": SiteProfile(speed=0.1)}, **FAST))
    labels = [m.method for m in result.methods]
    assert labels == ["fedavg", "fedavg personalised", "fedbuff",
                      "fedbuff personalised"]
    sync, asynchronous = result.methods[0], result.methods[2]
    # Synchronous rounds wait for Switzerland: 10 steps at 0.1 s each per round.
    assert sync.times == pytest.approx([1.0, 2.0])
    assert asynchronous.times[-1] < sync.times[-1]
    assert asynchronous.note.startswith("asynchronous")


@pytest.mark.parametrize("text, message", [
    ("fedavg,fedsgd", "one of"), ("fedyogi:lr", "key=value"),
    ("fedprox:server_lr=1", "no option 'server_lr'"), (",", "empty")])
def test_bad_strategy_list(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_strategy_specs(text)


def test_same_strategy_twice_is_rejected():
    with pytest.raises(ConfigError, match="listed twice"):
        SimulationConfig(strategy="fedavg,fedavg").validate()


def test_cli_prints_one_table_for_all(tmp_path, capsys):
    status = cli.run(["simulate", "--strategy", "fedavg,fedprox:mu=0.1",
                      "--rounds", "2", "--local-steps", "5", "--no-baselines",
                      "--site-speed", "Hungary=0.5", "--out", str(tmp_path / "run")])
    output = capsys.readouterr().out
    assert status == 0
    assert "fedprox(mu=0.1)" in output
    assert "simulated s" in output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["methods"]) == ["fedavg", "fedprox(mu=0.1)"]
    assert summary["methods"]["fedavg"]["simulated_seconds"] == pytest.approx(0.2)


def test_cli_rejects_bad_site_speed(tmp_path, capsys):
    status = cli.run(["simulate", "--site-speed", "Hungary", "--rounds", "1",
                      "--out", str(tmp_path / "run")])
    assert status == 2
    assert "SITE=NUMBER" in capsys.readouterr().err
