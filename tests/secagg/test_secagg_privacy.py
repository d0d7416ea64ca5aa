"""What the coordinator sees: record it all and try to recover one update."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from secagg_cases import make_round, site_names

from prifed.core.secure_sum import unpack_message
from prifed.secagg import SecAggClient, SecAggConfig, SecAggServer, crypto, shamir
from prifed.secagg.client import PAIRWISE_MASK, self_mask_key
from prifed.secagg.encoding import encode, pack_bits, unpack_bits
from prifed.secagg.messages import MASKED_INPUT, UNMASK


class RecordingServer(SecAggServer):
    """A coordinator that keeps a copy of every reply it receives."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seen: list[tuple[str, dict]] = []

    def receive(self, site: str, reply: dict) -> None:
        self.seen.append((site, reply))
        super().receive(site, reply)


def run_recorded(count: int, config: SecAggConfig, dropped: list[str],
                 silent: list[str]) -> tuple[RecordingServer, dict, dict, dict]:
    """Run a round where ``dropped`` skip upload and ``silent`` skip unmask."""
    # 1000 values keep the correlation check below 8 standard deviations wide.
    reference, updates, samples = make_round(count, 1000, seed=count)
    server = RecordingServer(1, site_names(count), reference, config)
    clients = {site: SecAggClient(site, 1, reference, updates[site], samples[site])
               for site in site_names(count)}
    requests = server.start()
    while requests:
        phase = next(iter(requests.values()))["phase"]
        for site, request in requests.items():
            if (phase == MASKED_INPUT and site in dropped) or (
                    phase == UNMASK and site in silent):
                continue
            server.receive(site, clients[site].handle(request))
        requests = server.close_phase()
    return server, clients, updates, {"reference": reference, "samples": samples}


def replies(server: RecordingServer, phase: str) -> dict[str, dict]:
    return {site: reply for site, reply in server.seen if reply["phase"] == phase}


@pytest.mark.parametrize(("count", "config"), [
    (10, SecAggConfig(mode="secagg")), (40, SecAggConfig(mode="secagg+"))])
def test_coordinator_cannot_recover_update(count: int, config: SecAggConfig,
                                           caplog: pytest.LogCaptureFixture) -> None:
    sites = site_names(count)
    dropped, silent = sites[1:3], sites[5:6]
    with caplog.at_level(logging.DEBUG, logger="prifed"):
        server, clients, updates, extra = run_recorded(count, config, dropped,
                                                       silent)
    reference, samples = extra["reference"], extra["samples"]
    plan = server.plan
    masked = replies(server, MASKED_INPUT)
    reveals = replies(server, UNMASK)
    delivered = [site for site in sites if site in masked]
    assert set(server.result().sites) == set(delivered)

    # 1. The coordinator never receives a mask-key share of a site that delivered,
    #    so it cannot rebuild that site's pairwise masks.
    for reply in reveals.values():
        assert not set(reply["key_shares"]) & set(delivered)

    # 2. No reply carries a site's plain update or its unmasked encoding.
    framed = [repr(reply).encode() for _, reply in server.seen]
    for site in sites:
        encoded = encode(updates[site], reference, samples[site], config.encoding)
        plain = pack_bits(encoded.vector & np.uint64(2**plan.bits - 1), plan.bits)
        raw = updates[site]["weight"].tobytes()
        for data in framed:
            assert plain[:32] not in data
            assert raw[:32] not in data

    # 3. Best attack with everything the coordinator received: remove the
    #    self mask (its seed is rebuilt from shares) and every pairwise mask
    #    with a dropped site (its key is rebuilt too). Masks with the other
    #    delivered neighbours remain, so the residual looks uniform.
    target = delivered[3]
    residual = attack(server, target, reveals)
    truth = encode(updates[target], reference, samples[target], config.encoding)
    truth_bits = truth.vector & np.uint64(2**plan.bits - 1)
    assert np.mean(residual == truth_bits) < 0.01
    fractions = residual.astype(np.float64) / 2.0**plan.bits
    assert 0.4 < fractions.mean() < 0.6
    signed_truth = truth.vector.view(np.int64).astype(np.float64)
    correlation = np.corrcoef(fractions, signed_truth)[0, 1]
    assert abs(correlation) < 0.25

    # 4. Control, so the attack above can fail: with the target's own mask key,
    #    which the coordinator never gets, the same attack recovers the update.
    with_key = attack(server, target, reveals,
                      own_key=crypto.private_bytes(clients[target]._mask_key))
    assert np.array_equal(with_key, truth_bits)

    # 5. The coordinator keeps only the running sum, not any masked vector.
    for name, value in vars(server).items():
        if isinstance(value, np.ndarray) and value.size >= residual.size:
            kept = value[:residual.size] & np.uint64(2**plan.bits - 1)
            for site in delivered:
                vector = unpack_bits(masked[site]["masked"], residual.size, plan.bits)
                assert not np.array_equal(kept, vector), name

    # 6. Logs name sites and counts, never update values.
    for site in sites:
        for value in updates[site]["weight"].ravel()[:5]:
            assert f"{value:.5f}" not in caplog.text


def attack(server: RecordingServer, target: str, reveals: dict[str, dict],
           own_key: bytes | None = None) -> np.ndarray:
    """Strip every mask of ``target`` that the given knowledge allows."""
    plan = server.plan
    length = server._length
    masked = replies(server, MASKED_INPUT)[target]["masked"]
    vector = unpack_bits(masked, length, plan.bits)
    seed_shares = {server.points[holder]: reply["seed_shares"][target]
                   for holder, reply in reveals.items()
                   if target in reply["seed_shares"]}
    seed = shamir.combine(seed_shares, plan.threshold, 32)
    vector -= crypto.mask(self_mask_key(seed, server.session, 1, target), length)
    lost_keys = {}
    for lost in server._lost:
        shares = {server.points[holder]: reply["key_shares"][lost]
                  for holder, reply in reveals.items()
                  if lost in reply["key_shares"]}
        lost_keys[lost] = shamir.combine(shares, plan.threshold, 32)
    delivered = replies(server, MASKED_INPUT)
    partners = [peer for peer in server.graph[target]
                if peer in delivered or peer in lost_keys]
    for peer in partners:
        if own_key is not None:
            private, public = own_key, server._keys[peer][1]
        elif peer in lost_keys:
            private, public = lost_keys[peer], server._keys[target][1]
        else:
            continue
        pair = crypto.pair_key(crypto.load_private(private), public, PAIRWISE_MASK,
                               server.session, 1, target, peer)
        if server.points[target] < server.points[peer]:
            vector -= crypto.mask(pair, length)
        else:
            vector += crypto.mask(pair, length)
    return vector & np.uint64(2**plan.bits - 1)


def test_requests_carry_no_update() -> None:
    reference, updates, samples = make_round(5, 100, seed=2)
    recorded: list[tuple[str, str, bytes]] = []
    from prifed.secagg import run_secagg_round

    run_secagg_round(updates, samples, reference, SecAggConfig("secagg"),
                     recorder=recorded)
    sent_to_sites = [data for direction, _, data in recorded if direction == "to"]
    assert sent_to_sites
    for site in site_names(5):
        raw = updates[site]["weight"].tobytes()[:32]
        assert all(raw not in data for data in sent_to_sites)
    # Every recorded message parses back with the JSON-and-bytes framing.
    for _, _, data in recorded:
        assert isinstance(unpack_message(data), dict)
