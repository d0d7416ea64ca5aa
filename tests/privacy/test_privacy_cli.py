"""The DP options of prifed simulate and the prifed privacy commands."""

import json

import pytest

from prifed import cli
from prifed.privacy.accountant import GaussianEvent, calibrate_noise_multiplier, \
    compute_epsilon
from prifed.privacy.policy import load_policy

FAST = ["--rounds", "2", "--local-steps", "10"]


def run_cli(args, capsys):
    status = cli.run(args)
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dp") / "run"
    status = cli.run(["simulate", *FAST, "--dp", "record", "--noise-multiplier",
                      "1.5", "--delta", "1e-3", "--out", str(folder)])
    assert status == 0
    return folder


def test_simulate_reports_spend_in_summary(dp_run):
    summary = json.loads((dp_run / "summary.json").read_text())
    privacy = summary["privacy"]
    assert privacy["mode"] == "record"
    rows = {name: site["train_rows"] for name, site in summary["sites"].items()}
    for name, entry in privacy["per_site"].items():
        expected = compute_epsilon([GaussianEvent(1.5, 4 / rows[name], 10)] * 2, 1e-3)
        assert entry["epsilon"] == pytest.approx(expected, rel=1e-5)
    assert privacy["federation"]["epsilon"] == max(
        e["epsilon"] for e in privacy["per_site"].values())
    # Baselines would train without DP, so a DP run leaves them out.
    assert list(summary["methods"]) == ["fedavg+dp-record"]


def test_simulate_writes_site_policies_and_ledgers(dp_run):
    policy = load_policy(dp_run / "sites" / "Cleveland")
    assert policy.epsilon_limit is None
    assert policy.delta == 1e-3
    assert (dp_run / "sites" / "Cleveland" / "privacy-ledger.sqlite").is_file()


def test_attack_command_writes_report(dp_run, capsys):
    status, output = run_cli(["privacy", "attack", str(dp_run)], capsys)
    assert status == 0
    assert "attack AUC" in output
    report = json.loads((dp_run / "attack.json").read_text())
    sites = [r["site"] for r in report["results"]]
    assert sites == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach",
                     "all sites"]
    assert report["privacy"]["mode"] == "record"
    assert 0 <= report["mean_site_auc"] <= 1


def test_ledger_command_shows_total(dp_run, capsys):
    status, output = run_cli(["privacy", "ledger", str(dp_run / "sites" / "Hungary")],
                             capsys)
    assert status == 0
    assert "Privacy ledger of site Hungary" in output
    assert "limit none" in output


def test_budget_refusal_ends_run_cleanly(tmp_path, capsys):
    status, output = run_cli(["simulate", *FAST, "--dp", "site", "--epsilon", "2",
                              "--epsilon-limit", "1.9", "--delta", "1e-3",
                              "--out", str(tmp_path / "run")], capsys)
    assert status == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    cleveland = summary["privacy"]["per_site"]["Cleveland"]
    assert cleveland["rounds_trained"] == 1
    assert cleveland["refusals"][0]["round"] == 2
    assert "above the limit 1.9" in cleveland["refusals"][0]["reason"]
    assert summary["rounds"][1]["skipped"] is True


def test_plan_command_matches_accountant(capsys):
    status, output = run_cli(["privacy", "plan", "--rows", "200", "--rounds", "15",
                              "--epsilon", "1", "--delta", "1e-3"], capsys)
    assert status == 0
    sigma = calibrate_noise_multiplier(1.0, 1e-3, 0.02, 1500)
    assert f"noise multiplier {sigma:.4g}" in output


def test_init_policy_refuses_to_overwrite(tmp_path, capsys):
    args = ["privacy", "init-policy", str(tmp_path), "--epsilon-limit", "3"]
    assert run_cli(args, capsys)[0] == 0
    assert load_policy(tmp_path).epsilon_limit == 3
    status, output = run_cli(args, capsys)
    assert status == 2
    assert "already exists" in output


def test_dp_with_batch_norm_fails_before_training(tmp_path, capsys):
    status, output = run_cli(["simulate", *FAST, "--model", "bn-mlp", "--dp",
                              "record", "--epsilon", "1", "--out",
                              str(tmp_path / "run")], capsys)
    assert status == 2
    assert "layer 'layers.1' (BatchNorm1d)" in output
    assert "GroupNorm" in output


def test_site_level_with_secure_aggregation(tmp_path):
    folder = tmp_path / "run"
    status = cli.run(["simulate", *FAST, "--dp", "site", "--noise-multiplier", "2",
                      "--delta", "1e-3", "--secure-aggregation", "secagg+",
                      "--out", str(folder)])
    assert status == 0
    privacy = json.loads((folder / "summary.json").read_text())["privacy"]
    assert "secure aggregation" in privacy["trust"]
    expected = compute_epsilon([GaussianEvent(2.0, 1.0, 1)] * 2, 1e-3)
    assert privacy["federation"]["epsilon"] == pytest.approx(expected, rel=1e-5)
