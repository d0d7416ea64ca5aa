"""The prifed command line: the main job, user CSVs and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from prifed import cli
from prifed.data.heart import heart_csv_path

PRIFED = [sys.executable, "-m", "prifed.cli"]
FAST = ["--rounds", "3", "--local-steps", "20"]


def run(args, tmp_path):
    return subprocess.run(PRIFED + args + ["--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)


def run_here(args, tmp_path, capsys):
    """Run the command line in this process; return its status and stderr."""
    status = cli.run(args + ["--out", str(tmp_path / "run")])
    return status, capsys.readouterr().err


def test_simulate_writes_run_folder(tmp_path):
    done = run(["simulate"] + FAST, tmp_path)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "run"
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["methods"]) == {"fedavg", "local", "pooled"}
    assert set(summary["sites"]) == {"Cleveland", "Hungary", "Switzerland",
                                     "VA Long Beach"}
    assert "upper reference" in summary["methods"]["pooled"]["note"]
    rounds = pd.read_csv(folder / "rounds.csv")
    assert sorted(rounds["round"].unique()) == [1, 2, 3]
    assert set(rounds["method"]) == {"fedavg", "local", "pooled"}
    model = load_file(str(folder / "model.safetensors"))
    assert model["linear.weight"].shape == (1, 13)
    assert (folder / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    card = (folder / "MODEL_CARD.md").read_text()
    assert "| Switzerland | 30 | 16 (16) |" in card
    assert "one class only" in card
    assert "mean" in done.stdout and "Cleveland" in done.stdout
    # Without a terminal, progress comes as one line per round.
    assert "fedavg round 3/3: mean accuracy" in done.stderr
    log = (folder / "run.log").read_text()
    assert "fit round 2/3: sampled 4 sites (Cleveland, Hungary" in log
    assert "evaluate round 3/3: site Switzerland, 16 test rows" in log


def test_fixed_seed_gives_identical_model(tmp_path):
    outputs = []
    for name in ("a", "b"):
        done = subprocess.run(PRIFED + ["simulate", *FAST, "--no-baselines",
                                        "--out", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append((tmp_path / name / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


@pytest.fixture()
def user_csv(tmp_path) -> Path:
    table = pd.read_csv(heart_csv_path())
    table = table.rename(columns={"dataset": "hospital"})
    table["target"] = (table["num"] > 0).astype(int)
    table = table.drop(columns=["num"])
    path = tmp_path / "mine.csv"
    table.to_csv(path, index=False)
    return path


def test_user_csv_with_detected_columns(user_csv, tmp_path):
    done = run(["simulate", "--data", str(user_csv), "--site-column", "hospital",
                "--label", "target", "--drop", "id", "--no-baselines"] + FAST,
               tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # Missing values are imputed, so all 920 rows stay (slope, ca, thal too).
    rows = sum(s["train_rows"] + s["test_rows"] for s in summary["sites"].values())
    assert rows == 920
    assert "ca" in summary["features"]
    assert "thal=normal" in summary["features"]


@pytest.mark.parametrize("args, message", [
    (["--site-column", "nowhere", "--label", "target"], "site column 'nowhere' not"),
    (["--site-column", "hospital", "--label", "nope"], "label 'nope' not found"),
    (["--site-column", "hospital", "--label", "target", "--numeric", "zzz"],
     "column 'zzz' not found"),
    (["--site-column", "hospital", "--label", "target", "--sites", "Mars,Hungary"],
     "site 'Mars' not found"),
    (["--site-column", "hospital", "--label", "cp"], "must be numeric"),
    (["--site-column", "hospital", "--label", "target", "--rounds", "0"],
     "rounds must be at least 1"),
])
def test_bad_arguments_give_one_clear_message(user_csv, tmp_path, args, message,
                                              capsys):
    status, err = run_here(["simulate", "--data", str(user_csv)] + args, tmp_path,
                           capsys)
    assert status == 2
    assert message in err
    assert "Traceback" not in err


def test_site_with_one_class_is_named(tmp_path, capsys):
    table = pd.DataFrame({"site": ["a"] * 6 + ["b"] * 6,
                          "x": np.arange(12.0),
                          "y": [0, 1] * 3 + [1] * 6})
    path = tmp_path / "one.csv"
    table.to_csv(path, index=False)
    status, err = run_here(["simulate", "--data", str(path), "--site-column", "site",
                            "--label", "y"], tmp_path, capsys)
    assert status == 2
    assert "site 'b' has one class only" in err


def test_tiny_site_is_named(tmp_path, capsys):
    table = pd.DataFrame({"site": ["a"] * 8 + ["b"] * 2, "x": np.arange(10.0),
                          "y": [0, 1] * 5})
    path = tmp_path / "tiny.csv"
    table.to_csv(path, index=False)
    status, err = run_here(["simulate", "--data", str(path), "--site-column", "site",
                            "--label", "y"], tmp_path, capsys)
    assert status == 2
    assert "site 'b' has 2 usable rows" in err


def test_missing_file_is_named(tmp_path, capsys):
    status, err = run_here(["simulate", "--data", str(tmp_path / "none.csv"),
                            "--site-column", "s", "--label", "y"], tmp_path, capsys)
    assert status == 2
    assert "data file not found" in err


@pytest.mark.parametrize("code", [0, 1, 2])
def test_coordinator_exit_code_reaches_shell(tmp_path, monkeypatch, code):
    from prifed.deploy.coordinator import Coordinator

    config = tmp_path / "federation.toml"
    config.write_text('[federation]\nname = "x"\nsites = ["A"]\n')
    monkeypatch.setattr(Coordinator, "serve", lambda self: code)
    assert cli.run(["coordinator", "--config", str(config)]) == code
