"""Unit checks of the deployment pieces: signatures, payloads, config, state codec."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import zstandard

from prifed.deploy import auth, wire
from prifed.deploy.config import parse_config
from prifed.deploy.errors import RequestRejected
from prifed.deploy.pki import generate_site_key, public_key_bytes, token_digest
from prifed.deploy.store import Store
from prifed.errors import ConfigError

ROSTER = {"federation": {"name": "unit", "sites": ["A", "B", "C"]}}


def _signed(key, **override):
    headers = auth.sign_request(key, "fed", "Site A", "POST", "/v1/x?y=1",
                                auth.sha256_hex(b"body"))
    return auth.parse_signed_headers(headers | override)


def test_signature_verifies_for_the_signed_request():
    key = generate_site_key()
    signed = _signed(key)
    assert signed.site == "Site A"
    auth.verify_signature(public_key_bytes(key), "fed", "POST", "/v1/x?y=1", signed)


@pytest.mark.parametrize(("federation", "method", "target"), [
    ("other-fed", "POST", "/v1/x?y=1"),
    ("fed", "PUT", "/v1/x?y=1"),
    ("fed", "POST", "/v1/x?y=2"),
])
def test_signature_bound_to_federation_method_and_target(federation, method, target):
    key = generate_site_key()
    with pytest.raises(RequestRejected) as caught:
        auth.verify_signature(public_key_bytes(key), federation, method, target,
                              _signed(key))
    assert caught.value.status == 401
    assert caught.value.code == "bad_signature"


def test_signature_bound_to_body_digest():
    key = generate_site_key()
    signed = dataclasses.replace(_signed(key), digest=auth.sha256_hex(b"other"))
    with pytest.raises(RequestRejected):
        auth.verify_signature(public_key_bytes(key), "fed", "POST", "/v1/x?y=1",
                              signed)


def test_timestamp_outside_skew_rejected():
    signed = _signed(generate_site_key())
    auth.check_timestamp(signed, 300, now=signed.timestamp_ms / 1000 + 299)
    with pytest.raises(RequestRejected) as caught:
        auth.check_timestamp(signed, 300, now=signed.timestamp_ms / 1000 + 301)
    assert "-301 s" in caught.value.detail


@pytest.mark.parametrize(("header", "value", "fragment"), [
    (auth.NONCE, "short", "32 lowercase hex"),
    (auth.TIMESTAMP, "soon", "integer of milliseconds"),
    (auth.DIGEST, "abc", "64 lowercase hex"),
    (auth.SIGNATURE, "***", "not valid base64"),
])
def test_malformed_auth_header_named(header, value, fragment):
    key = generate_site_key()
    headers = auth.sign_request(key, "fed", "A", "GET", "/", auth.EMPTY_DIGEST)
    headers[header] = value
    with pytest.raises(RequestRejected) as caught:
        auth.parse_signed_headers(headers)
    assert header in caught.value.detail
    assert fragment in caught.value.detail


def test_compressed_payload_round_trips():
    data = np.tile(np.arange(100, dtype=np.float32), 100).tobytes()
    packed = wire.compress(data)
    assert len(packed) < len(data) // 10
    assert wire.decompress(packed, len(data), "payload") == data


def test_decompression_bomb_refused_before_inflating():
    packed = wire.compress(b"\0" * 10_000_000)
    assert len(packed) < 2_000
    with pytest.raises(RequestRejected) as caught:
        wire.decompress(packed, 1_000_000, "update")
    assert caught.value.status == 413
    assert "decompresses to 10000000 bytes; the limit is 1000000" in \
        caught.value.detail


def test_frame_without_content_size_refused():
    stream = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(stream, closefd=False) as writer:
        writer.write(b"abc" * 100)
    with pytest.raises(RequestRejected) as caught:
        wire.decompress(stream.getvalue(), 10_000, "update")
    assert "must declare its content size" in caught.value.detail


def test_trailing_bytes_and_corruption_refused():
    packed = wire.compress(b"hello" * 100)
    with pytest.raises(RequestRejected) as trailing:
        wire.decompress(packed + b"more", 10_000, "update")
    assert "4 bytes after its zstandard frame" in trailing.value.detail
    corrupt = bytearray(packed)
    corrupt[-1] ^= 0xFF
    with pytest.raises(RequestRejected) as checksum:
        wire.decompress(bytes(corrupt), 10_000, "update")
    assert "corrupt" in checksum.value.detail


def test_update_carries_round_site_and_extras():
    params = {"w": np.ones((2, 3), np.float32), "n": np.array([4], np.int64)}
    extra = {"control_delta/w": np.full((2, 3), 0.5)}
    tensors, metadata = wire.decode_tensors(
        wire.encode_update(params, extra, "VA Long Beach", 7), 1 << 20, "update")
    assert metadata == {"format": wire.UPDATE_FORMAT, "site": "VA Long Beach",
                        "round": "7"}
    model, extras = wire.split_update(tensors, ["w", "n"])
    assert list(model) == ["w", "n"]
    assert np.array_equal(extras["control_delta/w"], extra["control_delta/w"])


def test_unsupported_dtype_rejected():
    payload = wire.encode_tensors({"w": np.ones(3, np.complex64)}, {})
    with pytest.raises(RequestRejected) as caught:
        wire.decode_tensors(payload, 1 << 20, "update")
    assert caught.value.status in (400, 422)


def test_json_turns_nan_into_null():
    assert wire.to_json({"auc": math.nan, "n": np.int64(3)}) == {"auc": None, "n": 3}
    assert wire.metrics_from_json({"auc": None, "accuracy": 0.5})["accuracy"] == 0.5
    assert math.isnan(wire.metrics_from_json({"auc": None})["auc"])


def test_strategy_state_round_trips_through_parts():
    from prifed.strategies import build_strategy

    strategy = build_strategy("fedadam", local_config={})
    params = {"w": np.array([1.0, 2.0], np.float32)}
    strategy.initialize(params, ["w"])
    state = strategy.state_dict()
    state["first_moment"] = {"w": np.array([0.25, -0.5])}
    values, arrays = wire.state_to_parts(state)
    restored = wire.state_from_parts(values, arrays)
    assert restored["trainable"] == state["trainable"]
    assert np.array_equal(restored["first_moment"]["w"], [0.25, -0.5])
    other = build_strategy("fedadam", local_config={})
    other.load_state_dict(restored)
    assert np.array_equal(other.state_dict()["first_moment"]["w"], [0.25, -0.5])


def test_config_defaults_match_simulate():
    from prifed.simulation import SimulationConfig

    config = parse_config(dict(ROSTER), Path("."))
    simulate = SimulationConfig()
    training = config.training
    pairs = [("rounds", training.rounds, simulate.rounds),
             ("local_steps", training.local_steps, simulate.local_steps),
             ("batch_size", training.batch_size, simulate.batch_size),
             ("lr", training.lr, simulate.lr),
             ("optimizer", training.optimizer, simulate.optimizer),
             ("model", training.model, simulate.model),
             ("standardize", training.standardize, simulate.standardize),
             ("test_fraction", training.test_fraction, simulate.test_fraction),
             ("seed", config.federation.seed, simulate.seed)]
    for name, deployed, simulated in pairs:
        assert deployed == simulated, name


@pytest.mark.parametrize(("raw", "fragment"), [
    ({"federation": {"name": "x", "sites": ["A"]}, "training": {"round": 3}},
     "training.round: Extra inputs are not permitted"),
    ({"federation": {"name": "x", "sites": ["A", "A"]}}, "site 'A' is listed twice"),
    ({"federation": {"name": "x", "sites": ["A"]}, "rounds": {"min_sites": 2}},
     "rounds.min_sites must be at most the number of sites (1); got 2"),
    ({"federation": {"name": "bad name!", "sites": ["A"]}}, "federation.name"),
    ({"federation": {"name": "x", "sites": ["A", "B"]},
      "training": {"sites_per_round": 1}, "rounds": {"min_sites": 2}},
     "rounds.min_sites (2) must be at most training.sites_per_round (1)"),
    ({"federation": {"name": "x", "sites": ["A", "B", "C"]},
      "training": {"strategy": "fedbuff", "secure_aggregation": "secagg"}},
     "training: strategy 'fedbuff' weighs each update"),
    ({"federation": {"name": "x", "sites": ["A"]},
      "training": {"model": "bn-mlp", "batch_size": 1}},
     "training: batch_size must be at least 2 for model 'bn-mlp'"),
    ({"federation": {"name": "x", "sites": ["A", "B"]},
      "training": {"strategy": "fedbuff", "rounds": 1,
                   "strategy_options": {"buffer_size": 3}}},
     "buffer_size (3) is larger than the run's 2 tasks"),
    ({"federation": {"name": "x", "sites": ["A", "B"]},
      "training": {"strategy": "FedBuff"},
      "privacy": {"mode": "record", "noise_multiplier": 1.0}},
     "cannot be combined with a [privacy] section"),
])
def test_invalid_config_names_the_key(raw, fragment):
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, Path("."))
    assert fragment in str(caught.value)


def test_resume_refuses_a_changed_config(tmp_path):
    base = parse_config(dict(ROSTER), tmp_path)
    changed = parse_config(dict(ROSTER, training={"rounds": 20}), tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'state.db'}", tmp_path / "state")
    store.bind_config(base.fingerprint(), base.fingerprint_digest())
    store.bind_config(base.fingerprint(), base.fingerprint_digest())
    with pytest.raises(ConfigError) as caught:
        store.bind_config(changed.fingerprint(), changed.fingerprint_digest())
    store.close()
    assert "changed: training.rounds" in str(caught.value)


def test_nonce_accepted_once(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}", tmp_path / "state")
    store.record_nonce("A", "0" * 32, 300)
    store.record_nonce("B", "0" * 32, 300)
    with pytest.raises(RequestRejected) as caught:
        store.record_nonce("A", "0" * 32, 300)
    assert caught.value.code == "replayed_request"
    assert store.purge_nonces(older_than=float("inf")) == 2
    store.close()


def test_only_token_digest_is_stored(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'state.db'}", tmp_path / "state")
    store.sync_roster(["A"])
    store.add_token("A", token_digest("pfj_secret-value"), 60)
    store.close()
    raw = (tmp_path / "state.db").read_bytes()
    wal = tmp_path / "state.db-wal"
    if wal.exists():
        raw += wal.read_bytes()
    assert b"pfj_secret-value" not in raw
    assert token_digest("pfj_secret-value").encode() in raw


def test_site_csv_without_site_column_keeps_all_rows(tmp_path):
    import pandas as pd

    from prifed.data.heart import heart_csv_path, heart_spec
    from prifed.data.tabular import TableSpec
    from prifed.deploy.sitedata import TableSource

    table = pd.read_csv(heart_csv_path())
    own = table[table["dataset"] == "Hungary"].drop(columns=["dataset"])
    own.to_csv(tmp_path / "hungary.csv", index=False)
    heart = heart_spec()
    spec = TableSpec("", heart.label, heart.numeric, heart.categorical, heart.drop,
                     heart.label_threshold, heart.drop_incomplete)
    alone = TableSource(tmp_path / "hungary.csv", spec).load("Hungary")
    shared = TableSource(None, None).load("Hungary")
    assert len(alone.rows) == len(shared.rows) == 260
    assert alone.numeric == shared.numeric
    assert alone.categorical == shared.categorical
    columns = shared.numeric + shared.categorical + ["__label__"]
    # Same rows in the same order; only the index differs with the file.
    assert alone.rows[columns].reset_index(drop=True).equals(
        shared.rows[columns].reset_index(drop=True))


def test_site_missing_from_csv_named():
    from prifed.deploy.sitedata import TableSource
    from prifed.errors import DataError

    with pytest.raises(DataError) as caught:
        TableSource(None, None).load("Atlantis")
    assert "no rows for site 'Atlantis' in column 'dataset'" in str(caught.value)
    assert "Cleveland" in str(caught.value)
