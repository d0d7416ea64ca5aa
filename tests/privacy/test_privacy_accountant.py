"""Epsilon from dp-accounting, pinned against Opacus and the Gaussian closed form."""

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from prifed.errors import ConfigError
from prifed.privacy.accountant import RDP_ORDERS, GaussianEvent, \
    calibrate_noise_multiplier, compute_epsilon, merge_events, sampling_rate


def gaussian_delta(epsilon: float, sigma: float) -> float:
    """Return the exact delta of one Gaussian mechanism (Balle and Wang 2018)."""
    a = 1 / (2 * sigma)
    return norm.cdf(a - epsilon * sigma) - math.exp(epsilon) * norm.cdf(
        -a - epsilon * sigma)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Invert the exact delta of one Gaussian mechanism for epsilon."""
    return brentq(lambda eps: gaussian_delta(eps, sigma) - delta, 1e-9, 100)


# Both libraries implement the RDP of the sampled Gaussian (Mironov et al.
# 2019). They agree exactly at integer orders and to about 0.1% at
# fractional ones, where their series differ.
RDP_AGREEMENT = 2e-3


def opacus_rdp(sigma, rate, steps, delta):
    accountant = RDPAccountant()
    accountant.history = [(sigma, rate, steps)]
    return accountant.get_epsilon(delta, alphas=list(RDP_ORDERS))


def test_rdp_matches_opacus_reference_case():
    event = GaussianEvent(1.1, 32 / 300, 100)
    ours = compute_epsilon([event], 1e-5, "rdp")
    assert ours == pytest.approx(opacus_rdp(1.1, 32 / 300, 100, 1e-5),
                                 rel=RDP_AGREEMENT)
    assert ours == pytest.approx(7.07, abs=0.01)


@pytest.mark.parametrize("sigma, rate, steps, delta", [
    (2.387, 4 / 200, 1500, 1e-3),
    (0.8, 0.01, 10_000, 1e-5),
    (5.0, 4 / 30, 1500, 1e-3),
])
def test_rdp_matches_opacus_across_settings(sigma, rate, steps, delta):
    ours = compute_epsilon([GaussianEvent(sigma, rate, steps)], delta, "rdp")
    assert ours == pytest.approx(opacus_rdp(sigma, rate, steps, delta),
                                 rel=RDP_AGREEMENT)


def test_pld_matches_opacus_prv():
    event = GaussianEvent(1.1, 32 / 300, 100)
    ours = compute_epsilon([event], 1e-5, "pld")
    accountant = PRVAccountant()
    accountant.history = [(1.1, 32 / 300, 100)]
    assert ours == pytest.approx(6.33, abs=0.01)
    assert ours == pytest.approx(accountant.get_epsilon(1e-5), rel=0.02)


@pytest.mark.parametrize("sigma, delta", [(1.0, 1e-5), (3.0, 1e-3), (0.7, 1e-2)])
def test_pld_matches_gaussian_closed_form(sigma, delta):
    exact = gaussian_epsilon(sigma, delta)
    assert compute_epsilon([GaussianEvent(sigma, 1.0, 1)], delta, "pld") == \
        pytest.approx(exact, rel=2e-3)


def test_rdp_bounds_gaussian_closed_form_from_above():
    exact = gaussian_epsilon(2.0, 1e-5)
    rdp = compute_epsilon([GaussianEvent(2.0, 1.0, 1)], 1e-5, "rdp")
    assert rdp >= exact
    assert rdp < 1.25 * exact


def test_composition_equals_one_gaussian_with_scaled_noise():
    # T Gaussian mechanisms with multiplier s compose to one with s / sqrt(T).
    composed = compute_epsilon([GaussianEvent(8.0, 1.0, 1)] * 16, 1e-5, "pld")
    assert composed == pytest.approx(gaussian_epsilon(2.0, 1e-5), rel=2e-3)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_zero_noise_gives_infinite_epsilon(accountant):
    events = [GaussianEvent(1.0, 0.1, 10), GaussianEvent(0.0, 0.1, 1)]
    assert compute_epsilon(events, 1e-5, accountant) == math.inf


def test_events_that_touch_no_record_spend_nothing():
    events = [GaussianEvent(0.0, 0.0, 5), GaussianEvent(0.0, 0.5, 0)]
    assert compute_epsilon(events, 1e-5) == 0.0


def test_merge_sums_steps_of_equal_mechanisms():
    merged = merge_events([GaussianEvent(1.0, 0.1, 10), GaussianEvent(2.0, 0.1, 5),
                           GaussianEvent(1.0, 0.1, 7)])
    assert merged == [GaussianEvent(1.0, 0.1, 17), GaussianEvent(2.0, 0.1, 5)]
    separate = compute_epsilon([GaussianEvent(1.0, 0.1, 10),
                                GaussianEvent(1.0, 0.1, 7)], 1e-5)
    assert separate == pytest.approx(opacus_rdp(1.0, 0.1, 17, 1e-5),
                                     rel=RDP_AGREEMENT)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibration_reaches_target_from_below(accountant):
    sigma = calibrate_noise_multiplier(1.0, 1e-3, 4 / 200, 1500, accountant)
    assert compute_epsilon([GaussianEvent(sigma, 4 / 200, 1500)], 1e-3,
                           accountant) <= 1.0
    assert compute_epsilon([GaussianEvent(0.98 * sigma, 4 / 200, 1500)], 1e-3,
                           accountant) > 1.0


def test_sampling_rate_is_batch_over_records():
    assert sampling_rate(4, 171) == 4 / 171
    with pytest.raises(ConfigError, match="at most the 30 records"):
        sampling_rate(31, 30)
    with pytest.raises(ConfigError, match="positive"):
        sampling_rate(0, 30)


def test_invalid_event_and_delta_are_rejected():
    with pytest.raises(ConfigError, match="noise_multiplier must be at least 0"):
        GaussianEvent(-1.0, 0.1, 1)
    with pytest.raises(ConfigError, match="delta must be between 0 and 1"):
        compute_epsilon([GaussianEvent(1.0, 0.1, 1)], 0.0)
