"""A deployed DP run: a site's own limit stops it after two rounds, across a restart.

Two real site processes train with site-level DP (noise multiplier 2, one
Gaussian mechanism per round). Hungary's policy allows epsilon 3.5 at delta
1e-5, which two rounds fit (3.19) and three do not (4.01); Cleveland sets no
limit. Hungary's agent is stopped after round 1 and started again: its ledger
on disk still contains round 1, so it trains round 2 and rejects round 3,
and the coordinator logs the rejection and finishes the run with Cleveland.
"""

from __future__ import annotations

import json

import dp_accounting
import pytest
from deploy_harness import Federation, stop, wait_until

from prifed.privacy.ledger import PrivacyLedger
from prifed.privacy.policy import LEDGER_FILE, SitePolicy, write_policy

SITES = ["Cleveland", "Hungary"]
LIMITS = {"Cleveland": None, "Hungary": 3.5}
PRIVACY = """
[privacy]
mode = "site"
noise_multiplier = 2.0
clip_norm = 1.0
delta = 1e-5
"""


def expected_epsilon(rounds: int) -> float:
    """Return the RDP epsilon of ``rounds`` Gaussian releases at sigma 2."""
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(2.0), rounds)
    return float(accountant.get_epsilon(1e-5))


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    fed = Federation.create(tmp_path_factory.mktemp("privacy"), sites=SITES,
                            rounds=3, local_steps=10, limits=PRIVACY)
    folders = {site: fed.root / "privacy" / site for site in SITES}
    for site, limit in LIMITS.items():
        write_policy(folders[site], SitePolicy(epsilon_limit=limit, delta=1e-5))
    args = {site: ["--privacy-dir", str(folders[site]), "--threads", "1"]
            for site in SITES}
    try:
        fed.start_coordinator()
        fed.start_site("Cleveland", args["Cleveland"])
        hungary = fed.start_site("Hungary", args["Hungary"])
        wait_until(lambda: "fit round 1/3: update accepted"
                   in fed.output("site-Hungary"), 90, "Hungary's round 1")
        stop(hungary)
        fed.start_site("Hungary", args["Hungary"])
        code = fed.wait_coordinator(120)
        yield fed, code, folders
    finally:
        fed.close()


def test_run_finishes_without_exhausted_site(private_run):
    fed, code, _ = private_run
    assert code == 0, fed.output("coordinator")[-3000:]
    summary = json.loads((fed.state_dir / "summary.json").read_text())
    accepted = [record["accepted"] for record in summary["rounds"]]
    assert accepted == [SITES, SITES, ["Cleveland"]]
    reason = summary["rounds"][2]["failures"]["Hungary"]
    assert "privacy budget of site 'Hungary' would be exceeded" in reason
    assert "above the limit 3.5" in reason
    log = fed.log_file.read_text()
    assert "site Hungary reported a failure: BudgetExhausted" in log


def test_ledger_survives_site_restart(private_run):
    _, _, folders = private_run
    expected = {"Cleveland": [1, 2, 3], "Hungary": [1, 2]}
    for site in SITES:
        entries = PrivacyLedger(folders[site] / LEDGER_FILE, site).entries()
        assert [e.server_round for e in entries] == expected[site]
        assert {(e.run_id, e.mode, e.noise_multiplier) for e in entries} == {
            ("test-fed", "site", 2.0)}
        for count, entry in enumerate(entries, start=1):
            assert entry.epsilon_total == pytest.approx(expected_epsilon(count),
                                                        rel=1e-9)
    assert expected_epsilon(2) < LIMITS["Hungary"] < expected_epsilon(3)
