"""Secure aggregation in ``prifed simulate``: the heart job matches the plain run."""

from __future__ import annotations

import numpy as np
import pytest

from prifed import cli
from prifed.errors import ConfigError, NotSupportedError
from prifed.simulation import SimulationConfig, run_simulation


def heart_config(**changes: object) -> SimulationConfig:
    return SimulationConfig(rounds=2, local_steps=20, baselines=False,
                            **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_heart_job_matches_plain_run(mode: str) -> None:
    plain = run_simulation(heart_config())
    masked = run_simulation(heart_config(secure_aggregation=mode))
    for name, value in plain.model.items():
        # Each round's mean is within 2**-17 of the plain one; local training
        # from the slightly different model stays as close after two rounds.
        np.testing.assert_allclose(masked.model[name], value, rtol=0, atol=1e-4)
    plain_final = plain.methods[0].final
    masked_final = masked.methods[0].final
    for site, metrics in plain_final.items():
        assert masked_final[site]["accuracy"] == metrics["accuracy"]
    record = masked.history[0]
    assert sorted(record.accepted) == sorted(plain_final)


def test_strategy_needing_updates_rejected_at_start() -> None:
    config = heart_config(strategy="scaffold", secure_aggregation="secagg+")
    with pytest.raises(NotSupportedError, match="strategy 'scaffold' needs each "
                       "site's update"):
        config.validate()


def test_unknown_mode_rejected() -> None:
    with pytest.raises(ConfigError, match="secure_aggregation must be one of off, "
                       "secagg, secagg\\+; got 'on'"):
        heart_config(secure_aggregation="on").validate()


def test_cli_flag_rejects_scaffold(tmp_path, capsys) -> None:
    status = cli.run(["simulate", "--rounds", "1", "--local-steps", "5",
                      "--no-baselines", "--strategy", "scaffold",
                      "--secure-aggregation", "secagg", "--out",
                      str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2
    assert "strategy 'scaffold' needs each site's update" in " ".join(err.split())
