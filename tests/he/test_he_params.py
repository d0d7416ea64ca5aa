"""Choice of CKKS parameters from sites, value range and precision."""

from __future__ import annotations

import math

import pytest
import tenseal as ts

from prifed.errors import ConfigError
from prifed.he.params import (
    HEADROOM_BITS,
    MAX_COEFF_BITS,
    CKKSParams,
    check_params,
    select_params,
)


@pytest.mark.parametrize("sites", [2, 10, 100])
def test_selection_meets_precision_headroom_security(sites: int) -> None:
    params = select_params(sites, value_range=1.0, precision=1e-6, max_weight=1e4)
    assert params.mean_error_bound(sites, 1.0) <= 1e-6
    magnitude = sites * 1e4
    assert params.data_bits >= params.scale_bits + math.log2(magnitude) + HEADROOM_BITS
    assert sum(params.coeff_mod_bit_sizes) <= \
        MAX_COEFF_BITS[params.poly_modulus_degree]
    # TenSEAL (SEAL) accepts the parameters, which it checks for 128-bit security.
    ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
               coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
               encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)


def test_selection_picks_smallest_degree() -> None:
    # 4 sites fit N = 4096 (109 bits); 100 sites at weight 1e4 need 60-bit
    # data primes, which only N = 8192 allows next to a special prime.
    assert select_params(4, 1.0, 1e-6, 1000.0).poly_modulus_degree == 4096
    assert select_params(100, 1.0, 1e-6, 1e4).poly_modulus_degree == 8192


def test_finer_precision_needs_larger_scale() -> None:
    coarse = select_params(10, 1.0, 1e-4, 100.0)
    fine = select_params(10, 1.0, 1e-8, 100.0)
    # A factor of 1e4 in precision is log2(1e4) = 13.3 bits of scale.
    assert fine.scale_bits - coarse.scale_bits in (13, 14)


def test_precision_below_float64_decoding_is_rejected() -> None:
    with pytest.raises(ConfigError) as error:
        select_params(100, 1.0, 1e-12, 1e4)
    message = str(error.value)
    assert "precision 1e-12 is finer than float64 decoding" in message
    assert "raise precision, or lower max_weight or value_range" in message


@pytest.mark.parametrize("field, value, text", [
    ("num_sites", 0, "num_sites must be at least 1; got 0"),
    ("value_range", -1.0, "value_range must be positive and finite; got -1.0"),
    ("precision", 0.0, "precision must be positive and finite; got 0.0"),
    ("max_weight", math.inf, "max_weight must be positive and finite; got inf"),
])
def test_invalid_bounds_are_named(field: str, value: float, text: str) -> None:
    options = {"num_sites": 4, "value_range": 1.0, "precision": 1e-6,
               "max_weight": 100.0, field: value}
    with pytest.raises(ConfigError, match=text):
        select_params(**options)  # type: ignore[arg-type]


def test_tutorial_parameters_are_too_coarse() -> None:
    # Noise bound of 10 sites at N = 4096: 8 * 1.1 * sqrt(3.2**2 + 1/12)
    # * sqrt(2048) * sqrt(10) = 4046, so 2.4e-4 at scale 2^24 and 4.8e-4 on
    # the mean; precision 1e-6 allows 5e-7 on the sum: 2^33 > 4046 / 5e-7.
    params = CKKSParams(4096, (40, 24, 40), 24, 10, 1.0, 100.0, 1e-6)
    with pytest.raises(ConfigError) as error:
        check_params(params)
    message = str(error.value)
    assert "by 0.00048, above the requested precision 1e-06" in message
    assert "use scale_bits of at least 33" in message


def test_security_limit_is_enforced() -> None:
    params = CKKSParams(4096, (60, 60), 40, 4, 1.0, 100.0, 1e-6)
    with pytest.raises(ConfigError, match="degree 4096 allows at most 109"):
        check_params(params)


def test_missing_headroom_says_what_to_change() -> None:
    # Sums up to 10 * 1e4 = 1e5 (17 bits) at scale 2^40 need 59 data bits.
    params = CKKSParams(8192, (50, 60), 40, 10, 1.0, 1e4, 1e-6)
    with pytest.raises(ConfigError) as error:
        check_params(params)
    assert "give 50 bits" in str(error.value)
    assert "need 59" in str(error.value)


def test_params_roundtrip_through_dict() -> None:
    params = select_params(7, 0.5, 1e-7, 300.0)
    assert CKKSParams.from_dict(params.to_dict()) == params


def test_malformed_params_dict_is_config_error() -> None:
    with pytest.raises(ConfigError, match="CKKS parameters are malformed"):
        CKKSParams.from_dict({"poly_modulus_degree": 4096})
