"""CKKS parameters chosen from the federation size, value range and precision.

Sites only add ciphertexts, so no multiplication level is needed: one chain of
data primes carries the whole sum and a special prime sits on top. The
requirements are:

- headroom: every slot of a sum of ``num_sites`` ciphertexts, times the scale,
  stays below half the data modulus, or CKKS decryption wraps it around;
- precision: the encryption noise of the sum, divided by the scale, stays
  below the requested error;
- security: the whole coefficient modulus fits the 128-bit bound of the
  Homomorphic Encryption Standard (2018) for the polynomial degree, which
  SEAL enforces as well.

The noise model is that of symmetric RLWE encryption in SEAL: each of the N
coefficients carries Gaussian noise of standard deviation 3.2 plus the
rounding of encoding (variance 1/12), so a decoded real slot has standard
deviation ``sqrt(3.2**2 + 1/12) * sqrt(N / 2) / scale``. Measured with
TenSEAL 0.3.18 over 40,000 slots for N = 4096 to 16384, the standard deviation
is 1-2% above this and the kurtosis is 3.0 (Gaussian). A sum of n
independent ciphertexts has sqrt(n) times that deviation. The bound used here
is 8 standard deviations (two-sided tail 1.2e-15 per value) with a 10% margin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from prifed.errors import ConfigError

MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
"""Largest coefficient modulus, in bits, for 128-bit security per degree."""

MAX_PRIME_BITS = 60
"""SEAL's largest prime in a coefficient modulus."""

MIN_PRIME_BITS = 24
"""Smallest prime for which SEAL finds enough primes at every degree here."""

NOISE_STD = 3.2
"""Standard deviation of SEAL's error distribution, per coefficient."""

NOISE_MARGIN = 1.1
TAIL_SIGMAS = 8.0

DECODE_RELATIVE_ERROR = 2.0 ** -48
"""Float64 error of decoding, relative to the largest slot magnitude.

Decoding converts coefficients to float64 and runs an FFT of depth log2(N).
Measured with TenSEAL 0.3.18 at N = 8192 to 32768 with negligible noise, the
error was at most 2**-50.2 of the magnitude; 2**-48 keeps a factor of 4.
"""

HEADROOM_BITS = 2
"""Sign bit plus one bit of margin above the largest encoded magnitude."""

DEFAULT_PRECISION = 1e-6
DEFAULT_VALUE_RANGE = 1.0
DEFAULT_MAX_WEIGHT = 10_000.0


@dataclass(frozen=True)
class CKKSParams:
    """Encryption parameters and the federation bounds they were chosen for.

    ``value_range`` bounds each value of a site's update (local model minus
    global model): values beyond ``±value_range`` are clipped and counted.
    ``max_weight`` bounds a site's weight (its sample count). ``precision`` is
    the largest absolute error allowed on each value of the weighted mean
    of up to ``num_sites`` updates, whenever the weights total at least 1.
    """

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    num_sites: int
    value_range: float = DEFAULT_VALUE_RANGE
    max_weight: float = DEFAULT_MAX_WEIGHT
    precision: float = DEFAULT_PRECISION

    @property
    def slots(self) -> int:
        """Real values per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return 2.0 ** self.scale_bits

    @property
    def data_bits(self) -> int:
        """Bits of the data modulus: every prime but the special one."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def max_slot_magnitude(self) -> float:
        """Largest magnitude of one slot in a sum of ``num_sites`` updates."""
        return max_slot_magnitude(self.num_sites, self.value_range, self.max_weight)

    def sum_error_bound(self, num_ciphertexts: int) -> float:
        """Bound the absolute error of each slot of a sum of ciphertexts."""
        noise = _noise_per_scale(self.poly_modulus_degree, num_ciphertexts)
        decode = self.max_slot_magnitude * DECODE_RELATIVE_ERROR
        return noise / self.scale + decode

    def mean_error_bound(self, num_ciphertexts: int, total_weight: float) -> float:
        """Bound the error of each value of the weighted mean after decryption.

        With sum ``S``, weight total ``T`` and errors ``e_S``, ``e_T`` of at most
        ``e``, the mean ``S / T`` has error at most ``e (1 + R) / (T - e)`` for
        updates clipped to ``±R``.
        """
        error = self.sum_error_bound(num_ciphertexts)
        if total_weight <= error:
            return math.inf
        return error * (1.0 + self.value_range) / (total_weight - error)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["coeff_mod_bit_sizes"] = list(self.coeff_mod_bit_sizes)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CKKSParams:
        """Rebuild parameters from :meth:`to_dict`, checking them again."""
        try:
            params = cls(
                poly_modulus_degree=int(values["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(
                    int(bits) for bits in values["coeff_mod_bit_sizes"]),
                scale_bits=int(values["scale_bits"]),
                num_sites=int(values["num_sites"]),
                value_range=float(values["value_range"]),
                max_weight=float(values["max_weight"]),
                precision=float(values["precision"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"CKKS parameters are malformed: {error!r}") from None
        check_params(params)
        return params


def max_slot_magnitude(num_sites: int, value_range: float, max_weight: float) -> float:
    """Return the largest slot of a sum: weighted values, weights or counts."""
    return num_sites * max(max_weight * value_range, max_weight, 1.0)


def _noise_per_scale(degree: int, num_ciphertexts: int) -> float:
    """Return the noise bound of a sum of ciphertexts, in units of 1 / scale."""
    std = NOISE_MARGIN * math.sqrt(NOISE_STD ** 2 + 1.0 / 12.0) * math.sqrt(degree / 2)
    return TAIL_SIGMAS * std * math.sqrt(max(num_ciphertexts, 1))


def _check_bounds(num_sites: int, value_range: float, max_weight: float,
                  precision: float) -> list[str]:
    problems = []
    if num_sites < 1:
        problems.append(f"num_sites must be at least 1; got {num_sites}")
    if not (value_range > 0 and math.isfinite(value_range)):
        problems.append(f"value_range must be positive and finite; got {value_range}")
    if not (max_weight > 0 and math.isfinite(max_weight)):
        problems.append(f"max_weight must be positive and finite; got {max_weight}")
    if not (precision > 0 and math.isfinite(precision)):
        problems.append(f"precision must be positive and finite; got {precision}")
    return problems


def _sum_tolerance(value_range: float, precision: float) -> float:
    """Return the error allowed on each slot of the sum for the mean's precision."""
    return precision / (1.0 + value_range)


def _split_bits(total: int) -> tuple[int, ...]:
    """Split data-modulus bits into as few primes as SEAL allows, evenly."""
    total = max(total, MIN_PRIME_BITS)
    count = math.ceil(total / MAX_PRIME_BITS)
    base, extra = divmod(total, count)
    return tuple(base + 1 if i < extra else base for i in range(count))


def select_params(num_sites: int, value_range: float = DEFAULT_VALUE_RANGE,
                  precision: float = DEFAULT_PRECISION,
                  max_weight: float = DEFAULT_MAX_WEIGHT) -> CKKSParams:
    """Choose the smallest CKKS parameters that meet the requested precision.

    The smallest polynomial degree that fits wins: it needs the fewest
    data-modulus bits, so its ciphertexts are the smallest and fastest.
    Raises ConfigError saying why and what to change when nothing fits.
    """
    problems = _check_bounds(num_sites, value_range, max_weight, precision)
    if problems:
        raise ConfigError("; ".join(problems))

    tolerance = _sum_tolerance(value_range, precision)
    magnitude = max_slot_magnitude(num_sites, value_range, max_weight)
    decode = magnitude * DECODE_RELATIVE_ERROR
    if tolerance <= 2 * decode:
        finest = 2 * decode * (1.0 + value_range)
        raise ConfigError(
            f"precision {precision:g} is finer than float64 decoding delivers for "
            f"sums of {num_sites} sites with value_range {value_range:g} and "
            f"max_weight {max_weight:g} (finest about {finest:.2g}); raise "
            "precision, or lower max_weight or value_range")

    headroom = math.ceil(math.log2(magnitude)) + HEADROOM_BITS
    for degree, budget in MAX_COEFF_BITS.items():
        noise = _noise_per_scale(degree, num_sites)
        scale_bits = max(1, math.ceil(math.log2(noise / (tolerance - decode))))
        data = _split_bits(scale_bits + headroom)
        special = max(data)
        if sum(data) + special <= budget:
            params = CKKSParams(degree, (*data, special), scale_bits, num_sites,
                                value_range, max_weight, precision)
            check_params(params)
            return params
    raise ConfigError(
        f"no polynomial degree up to 32768 reaches precision {precision:g} for "
        f"{num_sites} sites within 128-bit security; raise precision or lower "
        "max_weight or value_range")


def check_params(params: CKKSParams) -> None:
    """Check explicit parameters against security, headroom and precision.

    Collects every problem, then raises one ConfigError naming each field and
    the value that would work.
    """
    problems = _check_bounds(params.num_sites, params.value_range,
                             params.max_weight, params.precision)
    degree = params.poly_modulus_degree
    bits = params.coeff_mod_bit_sizes
    if degree not in MAX_COEFF_BITS:
        problems.append("poly_modulus_degree must be one of "
                        f"{', '.join(map(str, MAX_COEFF_BITS))}; got {degree}")
    if len(bits) < 2:
        problems.append("coeff_mod_bit_sizes needs at least one data prime and the "
                        f"special prime; got {list(bits)}")
    if any(not MIN_PRIME_BITS <= b <= MAX_PRIME_BITS for b in bits):
        problems.append(f"each of coeff_mod_bit_sizes must be {MIN_PRIME_BITS} to "
                        f"{MAX_PRIME_BITS} bits; got {list(bits)}")
    if problems:
        raise ConfigError("; ".join(problems))

    budget = MAX_COEFF_BITS[degree]
    if sum(bits) > budget:
        problems.append(f"coeff_mod_bit_sizes total {sum(bits)} bits; degree "
                        f"{degree} allows at most {budget} for 128-bit security")
    need = params.scale_bits + math.ceil(math.log2(params.max_slot_magnitude)) \
        + HEADROOM_BITS
    if params.data_bits < need:
        problems.append(
            f"data primes {list(bits[:-1])} give {params.data_bits} bits, but sums "
            f"of {params.num_sites} sites up to {params.max_slot_magnitude:g} at "
            f"scale 2^{params.scale_bits} need {need}; add data-prime bits or "
            "lower scale_bits, max_weight or value_range")
    error = params.mean_error_bound(params.num_sites, 1.0)
    if error > params.precision:
        tolerance = _sum_tolerance(params.value_range, params.precision)
        noise = _noise_per_scale(degree, params.num_sites)
        decode = params.max_slot_magnitude * DECODE_RELATIVE_ERROR
        wanted = math.ceil(math.log2(noise / max(tolerance - decode, 1e-300)))
        problems.append(
            f"scale 2^{params.scale_bits} bounds the error of the mean of "
            f"{params.num_sites} sites by {error:.2g}, above the requested "
            f"precision {params.precision:g}; use scale_bits of at least {wanted} "
            "or let PriFed choose the parameters")
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class HomomorphicSettings:
    """The federation bounds that fix the CKKS parameters of a run.

    ``max_weight`` defaults to the largest number of training rows of any
    site, which is each site's weight in FedAvg.
    """

    value_range: float = DEFAULT_VALUE_RANGE
    precision: float = DEFAULT_PRECISION
    max_weight: float | None = None
