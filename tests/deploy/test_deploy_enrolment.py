"""Enrolment against a real coordinator: join tokens, rejoin, revocation, TLS pinning.

The coordinator waits in its statistics phase the whole time; the test joins
sites by hand and drives the ``prifed ca`` commands in this process.
"""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import httpx
import pytest
from deploy_harness import Federation
from typer.testing import CliRunner

from prifed.cli import app
from prifed.deploy import auth, wire
from prifed.deploy.errors import CoordinatorError
from prifed.deploy.pki import generate_site_key, init_pki, public_key_bytes

SITES = ["Cleveland", "Hungary", "Spare"]
runner = CliRunner()


class Joiner:
    """Sends join and hello requests with chosen keys and tokens."""

    def __init__(self, fed: Federation) -> None:
        context = ssl.create_default_context(cafile=str(fed.ca_file))
        self.http = httpx.Client(base_url=fed.url, verify=context, trust_env=False,
                                 timeout=30)
        self.federation = fed.config.federation.name

    def join(self, site: str, token: str, key, signer=None) -> httpx.Response:
        body = wire.dumps({"site": site, "token": token, "public_key":
                           base64.b64encode(public_key_bytes(key)).decode()})
        return self.send("POST", "/v1/join", body, site, signer or key)

    def send(self, method: str, target: str, body: bytes, site: str,
             key) -> httpx.Response:
        headers = auth.sign_request(key, self.federation, site, method, target,
                                    auth.sha256_hex(body))
        return self.http.request(method, target, content=body or None,
                                 headers=headers)

    def hello(self, site: str, key) -> httpx.Response:
        return self.send("POST", "/v1/hello", b"{}", site, key)


@pytest.fixture(scope="module")
def enrolment(tmp_path_factory):
    fed = Federation.create(tmp_path_factory.mktemp("enrol"), sites=SITES)
    joiner = Joiner(fed)
    try:
        fed.start_coordinator()
        yield fed, joiner
    finally:
        joiner.http.close()
        fed.close()


def _status(fed: Federation, site: str) -> str:
    store = fed.store()
    info = store.site(site)
    store.close()
    assert info is not None
    return info.status


def test_healthz_names_only_the_federation(enrolment):
    fed, joiner = enrolment
    response = joiner.http.get("/healthz")
    assert response.json() == {"status": "ok", "federation": "test-fed"}


def test_join_with_wrong_token_rejected(enrolment):
    fed, joiner = enrolment
    response = joiner.join("Hungary", "pfj_not-the-token", generate_site_key())
    assert response.status_code == 401
    assert response.json()["error"] == "bad_token"
    assert _status(fed, "Hungary") == "invited"


def test_join_with_another_sites_token_rejected(enrolment):
    fed, joiner = enrolment
    response = joiner.join("Hungary", fed.tokens["Spare"], generate_site_key())
    assert response.status_code == 401
    assert response.json()["detail"] == "join token is not valid for site 'Hungary'"


def test_join_of_site_outside_roster_rejected(enrolment):
    _, joiner = enrolment
    response = joiner.join("Mallory", "pfj_whatever-token", generate_site_key())
    assert response.status_code == 403
    assert response.json()["error"] == "unknown_site"


def test_join_signed_by_other_key_rejected(enrolment):
    fed, joiner = enrolment
    response = joiner.join("Hungary", fed.tokens["Hungary"], generate_site_key(),
                           signer=generate_site_key())
    assert response.status_code == 401
    assert response.json()["error"] == "bad_signature"
    assert _status(fed, "Hungary") == "invited"


def test_token_joins_once(enrolment):
    fed, joiner = enrolment
    key = generate_site_key()
    assert joiner.join("Hungary", fed.tokens["Hungary"], key).status_code == 200
    assert _status(fed, "Hungary") == "joined"
    again = joiner.join("Hungary", fed.tokens["Hungary"], generate_site_key())
    assert again.status_code == 401
    assert "already used" in again.json()["detail"]
    assert joiner.hello("Hungary", key).status_code == 200


def test_expired_token_rejected(enrolment):
    fed, joiner = enrolment
    from prifed.deploy.pki import new_join_token, token_digest

    token = new_join_token()
    store = fed.store()
    store.add_token("Spare", token_digest(token), -1)
    store.close()
    response = joiner.join("Spare", token, generate_site_key())
    assert response.status_code == 401
    assert "expired" in response.json()["detail"]


def test_restarted_agent_gets_work_again(enrolment):
    fed, _ = enrolment
    first = fed.agent("Cleveland")
    first.connect()
    assert first.client is not None
    first.client.close()
    restarted = fed.agent("Cleveland")
    restarted.options.token = None
    restarted.connect()
    assert restarted.client is not None
    task = restarted.client.request("GET", "/v1/tasks/next", params={"wait": 5})
    restarted.client.close()
    assert task.status_code == 200
    assert task.json()["kind"] == "exchange"
    assert task.json()["channel"] == "statistics"


def test_revoked_site_rejected_then_reenrolled(enrolment, tmp_path):
    fed, joiner = enrolment
    key = generate_site_key()
    token_file = tmp_path / "spare-token"
    config = str(fed.root / "federation.toml")
    issued = runner.invoke(app, ["ca", "issue-token", "--config", config, "--site",
                                 "Spare", "--out", str(token_file)])
    assert issued.exit_code == 0, issued.output
    assert joiner.join("Spare", token_file.read_text().strip(), key).status_code == 200
    revoked = runner.invoke(app, ["ca", "revoke", "--config", config, "--site",
                                  "Spare"])
    assert revoked.exit_code == 0, revoked.output
    response = joiner.hello("Spare", key)
    assert response.status_code == 403
    assert response.json() == {"error": "revoked", "detail": "site 'Spare' is "
                               "revoked; ask the federation operator"}
    assert "site 'Spare': HTTP 403 revoked" in fed.log_file.read_text()
    status = runner.invoke(app, ["ca", "status", "--config", config])
    assert "Spare" in status.output
    assert "revoked" in status.output

    runner.invoke(app, ["ca", "issue-token", "--config", config, "--site", "Spare",
                        "--out", str(token_file)])
    new_key = generate_site_key()
    rejoined = joiner.join("Spare", token_file.read_text().strip(), new_key)
    assert rejoined.status_code == 200
    assert joiner.hello("Spare", new_key).status_code == 200
    assert joiner.hello("Spare", key).status_code == 401


def test_agent_rejects_coordinator_outside_ca(enrolment, tmp_path):
    fed, _ = enrolment
    other = init_pki(tmp_path / "other-pki", "other", ["localhost"], ["127.0.0.1"])
    agent = fed.agent("Hungary")
    agent.options.ca_file = other.ca_cert
    agent.options.state_dir = tmp_path / "hungary-other"
    with pytest.raises(CoordinatorError) as caught:
        agent.connect()
    assert caught.value.code == "tls_error"


def test_tokens_never_logged(enrolment):
    fed, _ = enrolment
    log = fed.log_file.read_text() + fed.output("coordinator")
    assert "join: site Hungary joined" in log
    for token in fed.tokens.values():
        assert token not in log
    assert "pfj_" not in log


def test_issue_token_rejects_unknown_site(enrolment):
    fed, _ = enrolment
    result = runner.invoke(app, ["ca", "issue-token", "--config",
                                 str(fed.root / "federation.toml"), "--site",
                                 "Mallory"])
    assert result.exit_code != 0
    assert isinstance(result.exception, Exception)
    assert "not in the federation's roster" in str(result.exception)
    assert Path(fed.root).exists()
