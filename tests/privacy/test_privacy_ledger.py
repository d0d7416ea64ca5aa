"""The site's ledger and policy: persistence, budget refusal, and no reset."""

import json
import sqlite3

import numpy as np
import pytest
from privacy_cases import TRAINING, global_params, instruction, make_factory, \
    make_site

from prifed.core.engine import RoundEngine
from prifed.core.messages import TrainInstruction
from prifed.core.strategy import FedAvg
from prifed.errors import ConfigError
from prifed.privacy.accountant import GaussianEvent, compute_epsilon
from prifed.privacy.errors import BudgetExhausted, PolicyError, UnsupportedLayerError
from prifed.privacy.ledger import PrivacyLedger
from prifed.privacy.policy import LEDGER_FILE, SitePolicy, load_policy
from prifed.privacy.settings import DPSettings
from prifed.privacy.strategy import PrivateStrategy
from prifed.transport.inprocess import InProcessTransport

POLICY = SitePolicy(epsilon_limit=None, delta=1e-3)


def test_ledger_survives_restart(tmp_path):
    path = tmp_path / LEDGER_FILE
    first = PrivacyLedger(path, "Hungary")
    events = [GaussianEvent(1.2, 0.05, 100), GaussianEvent(0.9, 0.05, 50)]
    for server_round, event in enumerate(events, start=1):
        first.record(event, POLICY, run_id="run-a", server_round=server_round,
                     mode="record", noise_placement="site-local", clip_norm=1.0)
    del first

    again = PrivacyLedger(path, "Hungary")
    entries = again.entries()
    assert [e.server_round for e in entries] == [1, 2]
    assert again.events() == events
    expected = compute_epsilon(events, 1e-3)
    assert entries[-1].epsilon_total == pytest.approx(expected)
    assert again.spent(POLICY) == pytest.approx(expected)


def test_ledger_rows_cannot_be_changed(tmp_path):
    path = tmp_path / LEDGER_FILE
    ledger = PrivacyLedger(path, "Hungary")
    ledger.record(GaussianEvent(1.0, 0.1, 10), POLICY, run_id="", server_round=1,
                  mode="record", noise_placement="site-local", clip_norm=1.0)
    connection = sqlite3.connect(path)
    for statement in ("DELETE FROM spend", "UPDATE spend SET epsilon_total = 0"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            connection.execute(statement)
    connection.close()
    assert len(ledger.entries()) == 1


def test_ledger_of_another_site_is_refused(tmp_path):
    PrivacyLedger(tmp_path / LEDGER_FILE, "Hungary")
    with pytest.raises(ConfigError, match="belongs to site 'Hungary'"):
        PrivacyLedger(tmp_path / LEDGER_FILE, "Cleveland")


def test_site_refuses_round_beyond_limit(tmp_path):
    site = make_site(tmp_path, limit=1.0)
    params = global_params()
    step = GaussianEvent(2.0, 4 / 40, 10)
    affordable = [n for n in range(1, 20)
                  if compute_epsilon([step] * n, 1e-3) <= 1.0][-1]
    for server_round in range(1, affordable + 1):
        reply = site.fit(params, instruction("Hungary", server_round))
        assert reply.metrics["dp_epsilon"] == pytest.approx(
            compute_epsilon([step] * server_round, 1e-3))
    with pytest.raises(BudgetExhausted) as refused:
        site.fit(params, instruction("Hungary", affordable + 1))
    assert refused.value.limit == 1.0
    assert refused.value.projected > 1.0
    assert "above the limit 1 set by the site" in str(refused.value)
    assert len(site.ledger.entries()) == affordable


def test_refusal_reaches_coordinator_and_run_goes_on(tmp_path):
    # Hungary can afford one round, Cleveland the whole run.
    hungary = make_site(tmp_path / "hu", "Hungary", limit=0.7)
    cleveland = make_site(tmp_path / "cl", "Cleveland", limit=50.0)
    strategy = PrivateStrategy(FedAvg(local_config=TRAINING), DPSettings(
        "record", 1e-3, noise_multiplier=2.0, planned_rounds=3))
    engine = RoundEngine(strategy, InProcessTransport([hungary, cleveland]), 3)
    factory = make_factory()
    engine.run(global_params(), [n for n, _ in factory().named_parameters()])
    first, second, third = engine.history
    assert sorted(first.accepted) == ["Cleveland", "Hungary"]
    assert second.accepted == ["Cleveland"]
    assert third.accepted == ["Cleveland"]
    reason = second.failures["Hungary"]
    assert reason.startswith("BudgetExhausted: privacy budget of site 'Hungary'")
    assert "limit 0.7" in reason


def test_budget_holds_across_restart(tmp_path):
    site = make_site(tmp_path, limit=0.7)
    params = global_params()
    site.fit(params, instruction("Hungary", 1))
    restarted = make_site(tmp_path, limit=0.7)
    assert len(restarted.ledger.entries()) == 1
    with pytest.raises(BudgetExhausted):
        restarted.fit(params, instruction("Hungary", 2))


def test_coordinator_cannot_reset_or_bypass(tmp_path):
    site = make_site(tmp_path, limit=50.0)
    params = global_params()
    site.fit(params, instruction("Hungary", 1))
    settings = instruction("Hungary", 2).config["dp"]

    tampered = [
        TrainInstruction("Hungary", 2, dict(TRAINING)),
        TrainInstruction("Hungary", 2, dict(TRAINING, dp=settings,
                                            reset_ledger=True)),
        TrainInstruction("Hungary", 2, dict(TRAINING, dp=dict(
            settings, ledger="/tmp/elsewhere.sqlite"))),
    ]
    messages = ["no 'dp' settings", "cannot apply config key 'reset_ledger'",
                "unknown dp setting 'ledger'"]
    for bad, message in zip(tampered, messages, strict=True):
        with pytest.raises((PolicyError, ConfigError), match=message):
            site.fit(params, bad)
    assert len(site.ledger.entries()) == 1


def test_policy_limits_modes_and_noise(tmp_path):
    site = make_site(tmp_path, limit=50.0, allowed_modes=("record",),
                     min_noise_multiplier=0.8)
    params = global_params()
    with pytest.raises(PolicyError, match="does not allow DP mode 'site'"):
        site.fit(params, instruction("Hungary", 1, mode="site"))
    with pytest.raises(PolicyError, match="at least 0.8; the round asks for 0.5"):
        site.fit(params, instruction("Hungary", 1, noise_multiplier=0.5))
    assert site.ledger.entries() == []


def test_zero_noise_reports_infinite_epsilon(tmp_path):
    site = make_site(tmp_path, limit=None)
    reply = site.fit(global_params(), instruction("Hungary", 1, noise_multiplier=0.0))
    assert reply.metrics["dp_epsilon"] == float("inf")
    assert site.ledger.entries()[0].epsilon_total == float("inf")


def test_zero_noise_is_refused_under_a_limit(tmp_path):
    site = make_site(tmp_path, limit=10.0)
    with pytest.raises(BudgetExhausted, match="raise it to inf"):
        site.fit(global_params(), instruction("Hungary", 1, noise_multiplier=0.0))


def test_unsupported_layer_fails_before_spending(tmp_path):
    factory = make_factory("bn-mlp")
    site = make_site(tmp_path, limit=50.0, factory=factory)
    with pytest.raises(UnsupportedLayerError, match="layer 'layers.1'"):
        site.fit(global_params(factory), instruction("Hungary", 1))
    assert site.ledger.entries() == []


def test_missing_or_invalid_policy_is_reported(tmp_path):
    with pytest.raises(PolicyError, match="privacy policy file not found"):
        load_policy(tmp_path)
    (tmp_path / "privacy-policy.json").write_text(json.dumps(
        {"epsilon_limit": -1, "delta": 1e-5}))
    with pytest.raises(PolicyError, match="field 'epsilon_limit' is invalid"):
        load_policy(tmp_path)
    (tmp_path / "privacy-policy.json").write_text(json.dumps(
        {"epsilon_limit": 1, "delta": 1e-5, "reset": True}))
    with pytest.raises(PolicyError, match="field 'reset' is invalid"):
        load_policy(tmp_path)


def test_site_mode_reply_is_clipped_and_weighted_one(tmp_path):
    site = make_site(tmp_path, limit=None)
    params = global_params()
    reply = site.fit(params, instruction("Hungary", 1, mode="site", clip_norm=0.01))
    delta = np.concatenate([(reply.params[n] - params[n]).ravel() for n in params])
    assert np.linalg.norm(delta) == pytest.approx(0.01, rel=1e-4)
    assert reply.num_samples == 1
    assert reply.metrics["dp_sample_rate"] == 1.0
    assert reply.metrics["dp_epsilon"] == pytest.approx(
        compute_epsilon([GaussianEvent(2.0, 1.0, 1)], 1e-3))
    assert "train_loss" not in reply.metrics


def test_site_mode_shares_need_min_sites(tmp_path):
    site = make_site(tmp_path, limit=None)
    with pytest.raises(PolicyError, match="name no min_sites"):
        site.fit(global_params(), instruction(
            "Hungary", 1, mode="site", noise_placement="sites"))
    reply = site.fit(global_params(), instruction(
        "Hungary", 1, mode="site", noise_placement="sites", min_sites=1,
        noise_multiplier=5.0, clip_norm=0.01))
    params = global_params()
    delta = np.concatenate([(reply.params[n] - params[n]).ravel() for n in params])
    # One share at min_sites 1 carries the full noise: std 5 * 0.01 per value.
    assert np.linalg.norm(delta) > 0.05
    assert site.ledger.entries()[0].noise_placement == "sites"
