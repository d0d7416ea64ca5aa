"""Deployed secure aggregation on 127.0.0.1 against the in-process simulation."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from deploy_harness import Federation, child_env

from prifed.deploy.config import load_config
from prifed.deploy.coordinator import Coordinator
from prifed.errors import ConfigError, NotSupportedError
from prifed.secagg.messages import MASKED_INPUT

ROUNDS, STEPS, LR = 2, 20, 0.01
KILLED = "Switzerland"
SCRIPT = Path(__file__).with_name("deploy_secagg_site.py")


@functools.lru_cache(maxsize=2)
def simulated_secure(mode: str) -> dict[str, np.ndarray]:
    """Return the final model of ``prifed simulate --secure-aggregation MODE``."""
    from prifed.simulation import SimulationConfig, run_simulation

    config = SimulationConfig(model="logreg", strategy="fedavg", rounds=ROUNDS,
                              local_steps=STEPS, batch_size=4, lr=LR,
                              optimizer="sgd", standardize="federated",
                              test_fraction=0.34, seed=42, baselines=False,
                              secure_aggregation=mode)
    return run_simulation(config).model


def simulated_dropout(rounds: int, dropped: str) -> dict[str, np.ndarray]:
    """Return the in-process secagg model when ``dropped`` stops at masked input."""
    from prifed.core.engine import RoundEngine
    from prifed.secagg.transport import secure_transport
    from prifed.sitedata import prepare_sites
    from prifed.strategies import build_strategy
    from prifed.training.client import SiteClient
    from prifed.training.models import build_model, get_params, trainable_names
    from prifed.transport.inprocess import InProcessTransport

    sites = prepare_sites(None, None, 42, 0.34, "federated")
    num_features = sites[0].train_x.shape[1]

    def factory():
        return build_model("logreg", num_features, 42)

    local = {"local_steps": STEPS, "batch_size": 4, "lr": LR, "optimizer": "sgd"}
    strategy = build_strategy("fedavg", local_config=local)
    clients = [SiteClient(s.name, factory, s.train_x, s.train_y, s.test_x, s.test_y,
                          42 + i) for i, s in enumerate(sites)]
    model = factory()
    params = get_params(model)
    transport = secure_transport("secagg", strategy, InProcessTransport(clients),
                                 params,
                                 dropouts=lambda _: {MASKED_INPUT: [dropped]})
    engine = RoundEngine(strategy, transport, rounds, seed=42)
    return engine.run(params, trainable_names(model))


def secure_federation(root: Path, mode: str, rounds: int = ROUNDS,
                      phase_deadline: float = 30.0, evaluate_deadline: float = 30.0,
                      linger: float = 20.0) -> Federation:
    fed = Federation.create(root, rounds=rounds, local_steps=STEPS, lr=LR,
                            keep_updates=True, evaluate_deadline=evaluate_deadline,
                            extra=f'secure_aggregation = "{mode}"')
    path = root / "federation.toml"
    text = path.read_text().replace(
        "[rounds]\n", f"[rounds]\nphase_deadline_seconds = {phase_deadline}\n")
    path.write_text(text.replace("linger_seconds = 20", f"linger_seconds = {linger}"))
    fed.config = load_config(path)
    return fed


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    fed = secure_federation(tmp_path_factory.mktemp("secagg"), "secagg+")
    try:
        fed.start_coordinator()
        sites = [fed.start_site(site) for site in fed.sites]
        code = fed.wait_coordinator()
        site_codes = [process.wait(60) for process in sites]
        yield fed, code, site_codes
    finally:
        fed.close()


def test_secure_model_equals_simulated(secure_run):
    fed, code, site_codes = secure_run
    assert code == 0, fed.output("coordinator")[-3000:]
    assert site_codes == [0, 0, 0, 0]
    deployed = fed.final_model()
    reference = simulated_secure("secagg+")
    assert sorted(deployed) == sorted(reference)
    for name, value in reference.items():
        assert deployed[name].dtype == value.dtype
        assert np.array_equal(deployed[name], value), name


def test_secure_run_uploads_no_update(secure_run):
    fed, _, _ = secure_run
    for folder in ("updates", "uploads"):
        stored = [p for p in (fed.state_dir / folder).rglob("*") if p.is_file()]
        assert stored == [], folder
    summary = json.loads((fed.state_dir / "summary.json").read_text())
    assert [r["server_round"] for r in summary["rounds"]] == [1, 2]
    for record in summary["rounds"]:
        assert sorted(record["accepted"]) == sorted(fed.sites)
        assert record["failures"] == {}
    log = fed.log_file.read_text()
    assert "phase masked_input closed with 4 of 4 replies" in log


def test_killed_site_is_dropped_and_round_completes(tmp_path):
    fed = secure_federation(tmp_path / "fed", "secagg", rounds=1, phase_deadline=4.0,
                            evaluate_deadline=4.0, linger=1.0)
    try:
        fed.start_coordinator()
        sites = []
        for site in fed.sites:
            if site != KILLED:
                sites.append(fed.start_site(site))
                continue
            args = [MASKED_INPUT, fed.url, str(fed.ca_file), site,
                    str(fed.site_dir(site)), str(fed.token_file(site))]
            output = open(fed.root / "site-killed.out", "ab")
            fed.logs.append(output)
            killed = subprocess.Popen([sys.executable, str(SCRIPT), *args],
                                      stdout=output, stderr=subprocess.STDOUT,
                                      env=child_env(), cwd=fed.root)
            fed.processes.append(killed)
        code = fed.wait_coordinator()
        assert code == 0, fed.output("coordinator")[-3000:]
        assert killed.wait(30) == -9
        summary = json.loads((fed.state_dir / "summary.json").read_text())
        record = summary["rounds"][0]
        assert sorted(record["accepted"]) == sorted(s for s in fed.sites
                                                    if s != KILLED)
        assert MASKED_INPUT in record["failures"][KILLED]
        deployed = fed.final_model()
        reference = simulated_dropout(1, KILLED)
        for name, value in reference.items():
            assert np.array_equal(deployed[name], value), name
        full = simulated_secure("secagg")
        assert not np.allclose(deployed["linear.weight"], full["linear.weight"])
    finally:
        fed.close()


def test_coordinator_rejects_individual_update_strategy(tmp_path):
    fed = Federation.create(tmp_path / "fed", extra='strategy = "scaffold"\n'
                            'secure_aggregation = "secagg"')
    with pytest.raises(NotSupportedError, match="'scaffold' needs each site's update"):
        Coordinator(fed.config)


def test_config_rejects_unknown_mode(tmp_path):
    with pytest.raises(ConfigError, match="training.secure_aggregation"):
        Federation.create(tmp_path / "fed", extra='secure_aggregation = "masked"')


def test_config_rejects_too_few_sites(tmp_path):
    fed = Federation.create(tmp_path / "fed", sites=["Cleveland", "Hungary"],
                            extra='secure_aggregation = "secagg"')
    with pytest.raises(ConfigError, match="at least 3 sites per round; got 2"):
        Coordinator(fed.config)
