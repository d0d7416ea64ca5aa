"""Bad requests against a real coordinator: each gets a precise error, state untouched.

One federation runs one round. Three sites train normally (one as a real
process, two as agents in this process). The test itself acts as Cleveland:
before sending its genuine update it sends every kind of bad request, and
after each one checks that the round is still open, that Cleveland has no
accepted update and that the coordinator logged the rejection. The run then
finishes with the same model as ``prifed simulate``, which shows that none of
the rejected requests changed what was aggregated.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from deploy_harness import Federation

from prifed.deploy import auth, wire
from prifed.deploy.pki import generate_site_key

ROUNDS, STEPS, LR = 1, 20, 0.01
MAX_UPDATE, MAX_CHUNK = 4096, 2048
SITE = "Cleveland"


@dataclass
class Outcome:
    """What the coordinator answered to one bad request, and what it left behind."""

    status: int
    body: dict[str, Any]
    claimed_site: str | None
    round_open: bool
    accepted_sites: list[str]
    latest_version: int


class Caller:
    """Sends hand-made requests to the coordinator, signed or not."""

    def __init__(self, fed: Federation, key: Any) -> None:
        context = ssl.create_default_context(cafile=str(fed.ca_file))
        self.http = httpx.Client(base_url=fed.url, verify=context, trust_env=False,
                                 timeout=30)
        self.federation = fed.config.federation.name
        self.key = key

    def headers(self, method: str, target: str, body: bytes, site: str = SITE,
                key: Any = None, **override: str) -> dict[str, str]:
        headers = auth.sign_request(key or self.key, self.federation, site, method,
                                    target, auth.sha256_hex(body))
        headers.update(override)
        return headers

    def send(self, method: str, target: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> httpx.Response:
        if headers is None:
            headers = self.headers(method, target, body)
        return self.http.request(method, target, content=body or None,
                                 headers=headers)

    def upload(self, payload: bytes, declared: bytes | None = None,
               server_round: int = 1, commit: bool = True,
               num_samples: int = 10) -> httpx.Response:
        """Run the upload protocol for ``payload``; return the last response."""
        declared = payload if declared is None else declared
        body = wire.dumps({"size": len(declared), "sha256": auth.sha256_hex(declared),
                           "num_samples": num_samples, "metrics": {}})
        started = self.send("POST", f"/v1/rounds/{server_round}/uploads", body)
        if started.status_code != 200 or started.json().get("status") != "open":
            return started
        upload = started.json()["upload"]
        chunk = self.send("PUT", f"/v1/uploads/{upload}", payload,
                          self.headers("PUT", f"/v1/uploads/{upload}", payload,
                                       **{"Upload-Offset": "0"}))
        if chunk.status_code != 200 or not commit:
            return chunk
        return self.send("POST", f"/v1/uploads/{upload}/commit", b"{}")


def tampered(params: dict[str, np.ndarray], name: str, value: np.ndarray
             ) -> bytes:
    changed = dict(params)
    changed[name] = value
    return wire.encode_update(changed, {}, SITE, 1)


def bad_requests(caller: Caller, genuine: dict[str, np.ndarray],
                 payload: bytes) -> dict[str, tuple[httpx.Response, str | None]]:
    """Send every bad request once; return each response and the site it claimed."""
    weight = genuine["linear.weight"]
    stranger = generate_site_key()
    results: dict[str, tuple[httpx.Response, str | None]] = {}
    results["unsigned"] = (caller.http.get("/v1/tasks/next"), None)
    target = "/v1/models/0"
    results["unknown site"] = (caller.send("GET", target, headers=caller.headers(
        "GET", target, b"", site="Nowhere", key=stranger)), "Nowhere")
    results["impostor"] = (caller.send("GET", target, headers=caller.headers(
        "GET", target, b"", key=stranger)), SITE)
    once = caller.headers("GET", target, b"")
    first = caller.send("GET", target, headers=once)
    assert first.status_code == 200
    results["replayed request"] = (caller.send("GET", target, headers=once), SITE)
    stale = caller.headers("GET", target, b"")
    stale = caller.headers("GET", target, b"", **{
        auth.TIMESTAMP: str(int(stale[auth.TIMESTAMP]) - 3_600_000)})
    results["stale timestamp"] = (caller.send("GET", target, headers=stale), SITE)
    results["wrong round"] = (caller.upload(payload, server_round=2), SITE)
    results["declared size over limit"] = (
        caller.upload(payload, declared=b"x" * (MAX_UPDATE + 1)), SITE)
    results["chunk over limit"] = (caller.upload(b"y" * (MAX_CHUNK + 1)), SITE)
    results["not zstd"] = (caller.upload(b"these bytes are no zstd frame"), SITE)
    results["truncated payload"] = (caller.upload(payload[:-9]), SITE)
    results["commit before the last byte"] = (
        _commit_half(caller, payload), SITE)
    results["not safetensors"] = (caller.upload(wire.compress(b"{}" * 40)), SITE)
    results["wrong metadata"] = (caller.upload(
        wire.encode_update(genuine, {}, SITE, 2)), SITE)
    results["wrong shape"] = (caller.upload(tampered(
        genuine, "linear.weight", weight[:, :-1])), SITE)
    results["wrong dtype"] = (caller.upload(tampered(
        genuine, "linear.weight", weight.astype(np.float64))), SITE)
    with_nan = weight.copy()
    with_nan[0, 3] = np.nan
    results["NaN value"] = (caller.upload(tampered(
        genuine, "linear.weight", with_nan)), SITE)
    results["missing tensor"] = (caller.upload(wire.encode_update(
        {"linear.weight": weight}, {}, SITE, 1)), SITE)
    results["malformed JSON"] = (caller.send("POST", "/v1/rounds/1/uploads",
                                             b"{not json"), SITE)
    results["negative num_samples"] = (caller.upload(payload, num_samples=-1), SITE)
    results["num_samples over the site's rows"] = (
        caller.upload(payload, num_samples=10**15), SITE)
    altered = caller.headers("POST", "/v1/rounds/1/failure", b'{"reason": "x"}')
    results["body altered in transit"] = (caller.send(
        "POST", "/v1/rounds/1/failure", b'{"reason": "y"}', altered), SITE)
    return results


def _commit_half(caller: Caller, payload: bytes) -> httpx.Response:
    response = caller.upload(payload[: len(payload) // 2], declared=payload,
                             commit=False)
    if response.status_code != 200:
        return response
    upload = response.json()["upload"]
    return caller.send("POST", f"/v1/uploads/{upload}/commit", b"{}")


@pytest.fixture(scope="module")
def bad_input_run(tmp_path_factory):
    limits = f"max_update_bytes = {MAX_UPDATE}\nmax_chunk_bytes = {MAX_CHUNK}"
    fed = Federation.create(tmp_path_factory.mktemp("bad-input"), rounds=ROUNDS,
                            local_steps=STEPS, lr=LR, limits=limits)
    threads: list[threading.Thread] = []
    try:
        fed.start_coordinator()
        fed.start_site("Hungary")
        for site in ("Switzerland", "VA Long Beach"):
            thread = threading.Thread(target=fed.agent(site).run, daemon=True)
            thread.start()
            threads.append(thread)
        cleveland = fed.agent(SITE)
        cleveland.connect()
        assert cleveland.client is not None
        while True:
            task = cleveland.client.request("GET", "/v1/tasks/next",
                                            params={"wait": 5})
            if task.status_code == 200 and task.json()["kind"] == "train":
                break
            if task.status_code == 200:
                cleveland.exchange(task.json())
        task = task.json()
        pending = cleveland._fit(task, cleveland.trainer(task["setup"]))
        genuine, _ = wire.decode_tensors(pending.payload, 1 << 20, "update")
        caller = Caller(fed, cleveland.client.key)
        store = fed.store()
        outcomes = {}
        for name, (response, claimed) in bad_requests(caller, genuine,
                                                      pending.payload).items():
            row = store.round_row(1)
            latest = store.latest_model()
            outcomes[name] = Outcome(
                response.status_code, response.json() if response.content else {},
                claimed, row is not None and row["status"] == "open",
                sorted(store.accepted_updates(1)),
                -1 if latest is None else latest.version)
        cleveland.upload(1, pending)
        cleveland._resolve_pending(pending)
        while cleveland.step():
            pass
        cleveland.client.close()
        caller.http.close()
        code = fed.wait_coordinator()
        for thread in threads:
            thread.join(60)
        store.close()
        yield fed, outcomes, code
    finally:
        fed.close()


CASES = [
    ("unsigned", 401, "unauthenticated", "missing header X-PriFed-Site"),
    ("unknown site", 401, "unknown_site", "'Nowhere' is not known"),
    ("impostor", 401, "bad_signature", "site 'Cleveland'"),
    ("replayed request", 401, "replayed_request", "nonce was already used"),
    ("stale timestamp", 401, "stale_request", "-3600 s"),
    ("wrong round", 409, "wrong_round",
     "round 2 is not open; site 'Cleveland' has round 1 open"),
    ("declared size over limit", 413, "too_large", "limit of 4096 bytes"),
    ("chunk over limit", 413, "too_large", "limit of 2048 bytes"),
    ("not zstd", 400, "malformed_payload", "not a zstandard frame"),
    ("truncated payload", 400, "truncated_payload", "truncated"),
    ("commit before the last byte", 409, "incomplete_upload", "send the rest"),
    ("not safetensors", 400, "malformed_payload", "not valid safetensors"),
    ("wrong metadata", 400, "wrong_metadata", "'round' must be '1'; got '2'"),
    ("wrong shape", 422, "update_rejected",
     "tensor 'linear.weight': shape must be (1, 13); got (1, 12)"),
    ("wrong dtype", 422, "update_rejected",
     "tensor 'linear.weight': dtype must be float32; got float64"),
    ("NaN value", 422, "update_rejected",
     "tensor 'linear.weight': contains NaN or infinite values"),
    ("missing tensor", 422, "update_rejected", "tensor 'linear.bias': missing"),
    ("malformed JSON", 400, "invalid_body", "upload request"),
    ("negative num_samples", 422, "invalid_body", "'num_samples'"),
    ("num_samples over the site's rows", 422, "update_rejected",
     "num_samples 1000000000000000 is more than the 200 training rows site "
     "'Cleveland' reported in setup"),
    ("body altered in transit", 400, "digest_mismatch", "signed SHA-256"),
]


@pytest.mark.parametrize(("case", "status", "code", "detail"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_request_rejected_precisely(bad_input_run, case, status, code, detail):
    _, outcomes, _ = bad_input_run
    outcome = outcomes[case]
    assert outcome.status == status
    assert outcome.body["error"] == code
    assert detail in outcome.body["detail"]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_request_leaves_state_untouched(bad_input_run, case):
    _, outcomes, _ = bad_input_run
    outcome = outcomes[case]
    assert outcome.round_open
    assert SITE not in outcome.accepted_sites
    assert outcome.latest_version == 0


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_request_logged_with_site(bad_input_run, case):
    fed, outcomes, _ = bad_input_run
    outcome = outcomes[case]
    log = fed.log_file.read_text()
    marker = f"site {outcome.claimed_site!r}: HTTP {outcome.status} " \
             f"{outcome.body['error']}"
    assert marker in log


def test_run_after_bad_input_matches_simulate(bad_input_run, simulated):
    fed, _, code = bad_input_run
    assert code == 0, fed.output("coordinator")[-3000:]
    deployed = fed.final_model()
    for name, value in simulated(ROUNDS, STEPS, LR).items():
        assert np.array_equal(deployed[name], value), name


def test_no_secret_in_coordinator_log(bad_input_run):
    fed, _, _ = bad_input_run
    log = fed.log_file.read_text() + fed.output("coordinator")
    for token in fed.tokens.values():
        assert token not in log
    assert auth.SIGNATURE not in log


def test_round_waited_for_the_genuine_update(bad_input_run):
    fed, _, _ = bad_input_run
    store = fed.store()
    record = store.round_records()[0]
    store.close()
    assert record["accepted"] == fed.sites
    assert record["rejected"] == {}
