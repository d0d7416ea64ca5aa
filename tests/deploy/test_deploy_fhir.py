"""A deployed run on FHIR exports: the spec hash travels and binds every site.

north and south build their tables from ``examples/fhir`` with the shipped
spec. east uses a copy of the spec with another version, so its hash differs
and the coordinator rejects its statistics, naming the site. The run goes on
with the two sites whose hash matches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from deploy_harness import Federation

from prifed.deploy import wire
from prifed.deploy.fhirsite import SPEC_HASH_KEY
from prifed.fhir import load_spec, spec_hash

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fhir"
SITES = ["north", "south", "east"]


@pytest.fixture(scope="module")
def fhir_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fhir")
    other_spec = root / "other-spec.toml"
    text = (EXAMPLE / "spec.toml").read_text()
    other_spec.write_text(text.replace('version = "1.0.0"', 'version = "1.0.1"'))
    shutil.copy(EXAMPLE / "spec.toml", root / "spec.toml")
    fed = Federation.create(root, sites=SITES, rounds=2, local_steps=10,
                            keep_updates=True,
                            limits='\n[fhir]\nspec = "spec.toml"\n')
    # The setup deadline is far longer than the run: the coordinator must stop
    # waiting for the site whose statistics it rejected, not wait it out.
    config = root / "federation.toml"
    config.write_text(config.read_text().replace("setup_deadline_seconds = 120",
                                                 "setup_deadline_seconds = 600"))
    try:
        fed.start_coordinator()
        processes = {}
        for site in SITES:
            spec = other_spec if site == "east" else EXAMPLE / "spec.toml"
            processes[site] = fed.start_site(site, ["--fhir", str(EXAMPLE / site),
                                                    "--fhir-spec", str(spec),
                                                    "--threads", "1"])
        code = fed.wait_coordinator(150)
        site_codes = {site: process.wait(60) for site, process in processes.items()}
        yield fed, code, site_codes
    finally:
        fed.close()


def test_run_trains_matching_sites_only(fhir_run):
    fed, code, site_codes = fhir_run
    assert code == 0, fed.output("coordinator")[-3000:]
    summary = json.loads((fed.state_dir / "summary.json").read_text())
    assert summary["participants"] == ["north", "south"]
    assert [r["accepted"] for r in summary["rounds"]] == [["north", "south"]] * 2
    assert site_codes["north"] == 0
    assert site_codes["south"] == 0
    assert site_codes["east"] != 0


def test_mismatched_site_named_in_error(fhir_run):
    fed, _, _ = fhir_run
    expected = spec_hash(EXAMPLE / "spec.toml")
    message = ("site 'east' sent statistics built with FHIR spec hash "
               f"{spec_hash(fed.root / 'other-spec.toml')[:16]}...; the federation "
               f"expects {expected[:16]}...")
    assert message in fed.log_file.read_text()
    assert message in fed.output("site-east")
    assert "setup: site east sent no statistics: reply rejected (" in \
        fed.log_file.read_text()


def test_updates_carry_spec_hash(fhir_run):
    fed, _, _ = fhir_run
    expected = spec_hash(EXAMPLE / "spec.toml")
    stored = sorted((fed.state_dir / "updates").rglob("*.safetensors.zst"))
    assert len(stored) == 4
    for path in stored:
        _, metadata = wire.decode_tensors(path.read_bytes(), 1 << 26, "update")
        assert metadata[SPEC_HASH_KEY] == expected


def test_model_has_one_weight_per_feature(fhir_run):
    fed, _, _ = fhir_run
    features = len(load_spec(EXAMPLE / "spec.toml").features)
    shapes = sorted(value.shape for value in fed.final_model().values())
    assert shapes == [(1,), (1, features)]
