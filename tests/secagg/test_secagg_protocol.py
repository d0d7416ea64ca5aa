"""Secure aggregation rounds: accuracy, dropouts, aborts and rejected messages."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from secagg_cases import make_round, plain_mean, site_names

from prifed.core.secure_sum import Message, MessageRejected, PrivateSumAborted
from prifed.errors import ConfigError, ProtocolError
from prifed.secagg import (
    FixedPoint,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    run_secagg_round,
)
from prifed.secagg.client import CIPHERTEXT_BYTES
from prifed.secagg.messages import (
    ADVERTISE_KEYS,
    MASKED_INPUT,
    SHARE_KEYS,
    UNMASK,
)

FULL = SecAggConfig(mode="secagg")
PLUS = SecAggConfig(mode="secagg+")


def assert_matches_plain(result_mean: dict[str, np.ndarray],
                         weighted_sum: dict[str, np.ndarray], total_weight: float,
                         max_error: float, expected: dict[str, np.ndarray]) -> None:
    """Check the float64 mean within the stated bound, and the cast result."""
    for name, value in expected.items():
        mean64 = weighted_sum[name] / total_weight
        assert np.max(np.abs(mean64 - value)) <= max_error, name
        # Casting to the model's dtype adds at most half a unit in the last place.
        dtype = result_mean[name].dtype
        if np.issubdtype(dtype, np.floating):
            ulp = np.spacing(np.abs(value).astype(dtype)).astype(np.float64)
            gap = np.abs(result_mean[name].astype(np.float64) - value)
            assert np.all(gap <= max_error + ulp), name
        else:
            assert np.array_equal(result_mean[name], np.rint(value).astype(dtype))


@pytest.mark.parametrize(("count", "config"), [
    (3, FULL), (10, FULL), (50, FULL), (3, PLUS), (10, PLUS), (50, PLUS),
    # The full graph at 200 sites costs about 80,000 key agreements per round,
    # so 200 sites run with SecAgg+ only, on 20-value models.
    (200, PLUS),
])
def test_matches_plain_mean(count: int, config: SecAggConfig) -> None:
    values = 20 if count == 200 else 60
    reference, updates, samples = make_round(count, values, seed=count)
    result = run_secagg_round(updates, samples, reference, config)
    expected = plain_mean(updates, samples, site_names(count))
    summed = result.private_sum
    assert summed.total_weight == sum(samples.values())
    assert summed.sites == tuple(site_names(count))
    assert summed.clipped == 0
    assert 0 < summed.max_error <= 0.5 * 2.0**-16
    assert result.mean is not None
    assert_matches_plain(result.mean, summed.weighted_sum, summed.total_weight,
                         summed.max_error, expected)


def test_secaggplus_uses_sparse_graph() -> None:
    reference, updates, samples = make_round(200, 10, seed=1)
    server = SecAggServer(1, site_names(200), reference, PLUS)
    degrees = {len(near) for near in server.graph.values()}
    assert degrees == {32}
    assert server.plan.threshold == 17
    for site, near in server.graph.items():
        for peer in near:
            assert site in server.graph[peer]


def test_clipped_values_counted_in_sum() -> None:
    reference, updates, samples = make_round(5, 20, seed=3)
    updates["site-001"]["weight"][0, :3] += 5.0
    updates["site-004"]["bias"][0] -= 7.0
    result = run_secagg_round(updates, samples, reference, FULL)
    assert result.private_sum.clipped == 4


@pytest.mark.parametrize("config", [FULL, PLUS])
def test_dropouts_after_sharing_and_upload(config: SecAggConfig) -> None:
    reference, updates, samples = make_round(40, 30, seed=5)
    sites = site_names(40)
    after_sharing = sites[3:7]
    after_upload = sites[10:14]
    result = run_secagg_round(updates, samples, reference, config, dropouts={
        MASKED_INPUT: after_sharing, UNMASK: after_upload})
    kept = [site for site in sites if site not in after_sharing]
    summed = result.private_sum
    assert summed.sites == tuple(kept)
    assert set(summed.dropped) == set(after_sharing)
    assert summed.total_weight == sum(samples[site] for site in kept)
    assert result.mean is not None
    assert_matches_plain(result.mean, summed.weighted_sum, summed.total_weight,
                         summed.max_error, plain_mean(updates, samples, kept))


def test_dropout_before_sharing_excluded() -> None:
    reference, updates, samples = make_round(10, 20, seed=6)
    sites = site_names(10)
    result = run_secagg_round(updates, samples, reference, FULL,
                              dropouts={ADVERTISE_KEYS: sites[:1],
                                        SHARE_KEYS: sites[1:3]})
    kept = sites[3:]
    assert result.private_sum.sites == tuple(kept)
    assert result.private_sum.dropped["site-001"].startswith("share_keys")
    assert result.mean is not None
    assert_matches_plain(result.mean, result.private_sum.weighted_sum,
                         result.private_sum.total_weight,
                         result.private_sum.max_error,
                         plain_mean(updates, samples, kept))


def test_abort_below_threshold_after_upload() -> None:
    reference, updates, samples = make_round(10, 20, seed=7)
    sites = site_names(10)
    # Threshold 6 of 10: five sites missing the unmask phase leave five.
    with pytest.raises(PrivateSumAborted, match="fewer than the threshold 6") as caught:
        run_secagg_round(updates, samples, reference, FULL,
                         dropouts={UNMASK: sites[:5]})
    assert caught.value.phase == UNMASK
    assert "previous global model is kept" in str(caught.value)


def test_abort_below_threshold_before_reveal() -> None:
    reference, updates, samples = make_round(10, 20, seed=8)
    sites = site_names(10)
    recorded: list[tuple[str, str, bytes]] = []
    with pytest.raises(PrivateSumAborted, match="5 of 10 sites remain") as caught:
        run_secagg_round(updates, samples, reference, FULL,
                         dropouts={MASKED_INPUT: sites[:5]}, recorder=recorded)
    assert caught.value.phase == MASKED_INPUT
    # The round stopped before asking any site to reveal a share.
    assert not any(b'"phase":"unmask"' in data for _, _, data in recorded)


def test_secaggplus_abort_when_neighbourhood_too_small() -> None:
    reference, updates, samples = make_round(60, 10, seed=9)
    server = SecAggServer(1, site_names(60), reference, PLUS)
    victim = "site-000"
    # Drop the victim's neighbours after sharing but keep most sites: the
    # victim's seed can no longer be rebuilt from its neighbourhood.
    near = server.graph[victim]
    gone = near[:len(near) - server.plan.threshold + 2]
    with pytest.raises(PrivateSumAborted, match="seed shares of site 'site-000'"):
        drive(server, clients_for(updates, samples, reference),
              drop={MASKED_INPUT: gone})


def clients_for(updates: dict, samples: dict, reference: dict, server_round: int = 1
                ) -> dict[str, SecAggClient]:
    return {site: SecAggClient(site, server_round, reference, updates[site],
                               samples[site]) for site in updates}


def drive(server: SecAggServer, clients: dict[str, SecAggClient],
          drop: dict[str, list[str]] | None = None, until: str | None = None
          ) -> dict[str, Message]:
    """Run phases until ``until`` is the open phase; return its requests."""
    requests = server.start()
    gone: set[str] = set()
    while requests:
        phase = next(iter(requests.values()))["phase"]
        if phase == until:
            return requests
        gone |= set((drop or {}).get(phase, []))
        for site, request in requests.items():
            if site not in gone:
                server.receive(site, clients[site].handle(request))
        requests = server.close_phase()
    return {}


def test_reappearing_site_refused() -> None:
    reference, updates, samples = make_round(6, 10, seed=10)
    server = SecAggServer(1, site_names(6), reference, FULL)
    clients = clients_for(updates, samples, reference)
    late = "site-002"
    requests = drive(server, clients, until=MASKED_INPUT)
    for site, request in requests.items():
        if site != late:
            server.receive(site, clients[site].handle(request))
    unmask_requests = server.close_phase()
    assert late not in unmask_requests
    # The late site finishes its masked input after the phase closed.
    stale = clients[late].handle(requests[late])
    with pytest.raises(MessageRejected, match="site 'site-002'") as caught:
        server.receive(late, stale)
    assert "declared dropped (masked_input: sent no masked input" in caught.value.reason
    assert "refused for the rest of this round" in caught.value.reason
    for site, request in unmask_requests.items():
        server.receive(site, clients[site].handle(request))
    assert server.close_phase() == {}
    assert late not in server.result().sites
    assert server.result().total_weight == sum(
        samples[site] for site in site_names(6) if site != late)


def test_double_submission_rejected() -> None:
    reference, updates, samples = make_round(5, 10, seed=11)
    server = SecAggServer(1, site_names(5), reference, FULL)
    clients = clients_for(updates, samples, reference)
    requests = drive(server, clients, until=MASKED_INPUT)
    first = clients["site-001"].handle(requests["site-001"])
    server.receive("site-001", first)
    with pytest.raises(MessageRejected, match="second reply in phase masked_input"
                       ) as caught:
        server.receive("site-001", first)
    assert caught.value.site == "site-001"
    for site, request in requests.items():
        if site != "site-001":
            server.receive(site, clients[site].handle(request))
    requests = server.close_phase()
    for site, request in requests.items():
        server.receive(site, clients[site].handle(request))
    server.close_phase()
    summed = server.result()
    # Counted once: the total weight is the plain sum of sample counts.
    assert summed.total_weight == sum(samples.values())


def test_wrong_length_vector_rejected_round_continues() -> None:
    reference, updates, samples = make_round(8, 30, seed=12)
    bad = "site-005"

    def shorten(site: str, reply: Message) -> Message:
        if site == bad and reply["phase"] == MASKED_INPUT:
            return dict(reply, masked=reply["masked"][:-3])
        return reply

    result = run_secagg_round(updates, samples, reference, FULL, intercept=shorten)
    reasons = [error for error in result.rejected if error.site == bad]
    assert len(reasons) == 1
    assert "masked vector must be" in reasons[0].reason
    kept = [site for site in site_names(8) if site != bad]
    assert result.private_sum.sites == tuple(kept)
    assert "malformed reply" in result.private_sum.dropped[bad]
    assert result.mean is not None
    assert_matches_plain(result.mean, result.private_sum.weighted_sum,
                         result.private_sum.total_weight,
                         result.private_sum.max_error,
                         plain_mean(updates, samples, kept))


def test_tampered_share_reported_round_continues(caplog: pytest.LogCaptureFixture
                                                 ) -> None:
    reference, updates, samples = make_round(8, 20, seed=13)
    sender, recipient = "site-002", "site-006"

    def tamper(site: str, reply: Message) -> Message:
        if site == sender and reply["phase"] == SHARE_KEYS:
            sealed = bytearray(reply["ciphertexts"][recipient])
            sealed[-1] ^= 1
            table = dict(reply["ciphertexts"], **{recipient: bytes(sealed)})
            return dict(reply, ciphertexts=table)
        return reply

    with caplog.at_level(logging.WARNING, logger="prifed"):
        result = run_secagg_round(updates, samples, reference, FULL,
                                  intercept=tamper)
    assert "site site-006 rejects the share from site site-002: ciphertext " \
           "failed authentication" in caplog.text
    assert "site site-006 reports the share from site site-002 as invalid" \
           in caplog.text
    assert result.private_sum.sites == tuple(site_names(8))
    assert result.mean is not None
    assert_matches_plain(result.mean, result.private_sum.weighted_sum,
                         result.private_sum.total_weight,
                         result.private_sum.max_error,
                         plain_mean(updates, samples, site_names(8)))


@pytest.mark.parametrize(("field", "change", "message"), [
    ("seed_shares", lambda share: share[:-1], "must be 66 bytes; got 65"),
    ("seed_shares", lambda share: b"\xff" * 66, "not below the field prime"),
])
def test_malformed_revealed_share_rejected(field: str, change, message: str) -> None:
    reference, updates, samples = make_round(8, 20, seed=14)
    bad = "site-003"

    def corrupt(site: str, reply: Message) -> Message:
        if site == bad and reply["phase"] == UNMASK:
            table = {owner: change(share) for owner, share in reply[field].items()}
            return dict(reply, **{field: table})
        return reply

    result = run_secagg_round(updates, samples, reference, FULL, intercept=corrupt)
    reasons = [error.reason for error in result.rejected if error.site == bad]
    assert len(reasons) == 1
    assert message in reasons[0]
    # The site delivered its masked input, so its update stays in the sum.
    assert result.private_sum.sites == tuple(site_names(8))
    assert result.private_sum.total_weight == sum(samples.values())


def test_wrong_share_count_rejected_naming_site() -> None:
    reference, updates, samples = make_round(6, 10, seed=15)
    bad = "site-004"

    def drop_one(site: str, reply: Message) -> Message:
        if site == bad and reply["phase"] == SHARE_KEYS:
            table = dict(reply["ciphertexts"])
            table.pop("site-000")
            return dict(reply, ciphertexts=table)
        return reply

    result = run_secagg_round(updates, samples, reference, FULL, intercept=drop_one)
    reasons = [error.reason for error in result.rejected if error.site == bad]
    assert reasons == ["malformed reply: no share for neighbour 'site-000'"]
    assert bad not in result.private_sum.sites


def test_reply_for_other_round_rejected() -> None:
    reference, updates, samples = make_round(4, 10, seed=16)
    server = SecAggServer(2, site_names(4), reference, FULL)
    with pytest.raises(MessageRejected, match="reply is for round 1, not 2"):
        server.start()
        server.receive("site-000", {"phase": ADVERTISE_KEYS, "round": 1,
                                    "c_pk": bytes(32), "s_pk": bytes(32)})
    with pytest.raises(MessageRejected, match="not part of this round"):
        server.receive("intruder", {"phase": ADVERTISE_KEYS, "round": 2})


def test_low_order_public_key_rejected() -> None:
    reference, updates, samples = make_round(4, 10, seed=17)
    server = SecAggServer(1, site_names(4), reference, FULL)
    server.start()
    with pytest.raises(MessageRejected, match="malformed reply"):
        server.receive("site-000", {"phase": ADVERTISE_KEYS, "round": 1,
                                    "c_pk": bytes(32), "s_pk": bytes(31) + b"\x01"})


def test_ciphertext_size_constant() -> None:
    # Nonce, recipient point, two 66-byte shares and the GCM tag.
    assert CIPHERTEXT_BYTES == 12 + 4 + 66 + 66 + 16


def test_start_refuses_too_many_sites() -> None:
    reference, updates, samples = make_round(3, 10)
    config = SecAggConfig(encoding=FixedPoint(clip=8.0, precision_bits=24,
                                              max_samples=2**28))
    with pytest.raises(ConfigError, match="largest number of sites this "
                       "configuration takes is 255"):
        SecAggServer(1, site_names(300), reference, config)


def test_start_refuses_bad_threshold() -> None:
    reference, updates, samples = make_round(3, 10)
    with pytest.raises(ConfigError, match="threshold must be at most 3"):
        SecAggServer(1, site_names(3), reference, SecAggConfig("secagg", 4))
    with pytest.raises(ConfigError, match="threshold must be at least 2"):
        SecAggConfig("secagg", 1)
    with pytest.raises(ConfigError, match="at least 3 sites; got 2"):
        SecAggServer(1, site_names(2), reference, FULL)


def test_client_rejects_narrow_modulus() -> None:
    reference, updates, samples = make_round(4, 10, seed=18)
    server = SecAggServer(1, site_names(4), reference, FULL)
    request = server.start()["site-000"]
    client = SecAggClient("site-000", 1, reference, updates["site-000"], 10)
    with pytest.raises(ProtocolError, match="bits must be between 36 and 64 so "
                       "that a sum over 4 sites cannot wrap; got 32"):
        client.handle(dict(request, bits=32))


def test_client_never_reveals_both_shares() -> None:
    reference, updates, samples = make_round(5, 10, seed=19)
    server = SecAggServer(1, site_names(5), reference, FULL)
    clients = clients_for(updates, samples, reference)
    requests = drive(server, clients, until=UNMASK)
    request = dict(requests["site-000"])
    request["dropped"] = ["site-001"]
    with pytest.raises(ProtocolError, match="listed as delivered and dropped"):
        clients["site-000"].handle(request)
    # A failed request ends the site's round, so later requests are rejected.
    with pytest.raises(ProtocolError, match="round 1 is finished"):
        clients["site-000"].handle(requests["site-000"])


def test_client_rejects_out_of_order_request() -> None:
    reference, updates, samples = make_round(4, 10, seed=20)
    client = SecAggClient("site-000", 1, reference, updates["site-000"], 10)
    with pytest.raises(ProtocolError, match="expected phase 'advertise_keys' of "
                       "round 1; got phase 'unmask'"):
        client.handle({"phase": UNMASK, "round": 1})


def test_client_repeats_reply_on_retry() -> None:
    reference, updates, samples = make_round(4, 10, seed=21)
    server = SecAggServer(1, site_names(4), reference, FULL)
    clients = clients_for(updates, samples, reference)
    requests = drive(server, clients, until=UNMASK)
    first = clients["site-000"].handle(requests["site-000"])
    again = clients["site-000"].handle(dict(requests["site-000"]))
    assert again == first
    # A different request after the last phase is still rejected.
    with pytest.raises(ProtocolError, match="round 1 is finished"):
        clients["site-000"].handle(dict(requests["site-000"], survivors=["site-000"]))


def test_repeated_public_key_rejected() -> None:
    reference, updates, samples = make_round(4, 10, seed=22)
    server = SecAggServer(1, site_names(4), reference, FULL)
    requests = server.start()
    clients = clients_for(updates, samples, reference)
    first = clients["site-000"].handle(requests["site-000"])
    server.receive("site-000", first)
    copied = dict(clients["site-001"].handle(requests["site-001"]),
                  s_pk=first["s_pk"])
    with pytest.raises(MessageRejected, match="public key already advertised by "
                       "site 'site-000'") as caught:
        server.receive("site-001", copied)
    assert caught.value.site == "site-001"
