"""Weighted aggregation: weights, dtypes and streaming."""

import numpy as np
import pytest

from prifed.core.aggregate import WeightedMean, weighted_mean


def test_weighted_mean_follows_sample_counts():
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([4.0, 8.0], np.float32)}
    mean = weighted_mean([(a, 1.0), (b, 3.0)])
    # (1*1 + 3*4) / 4 = 3.25 and (1*2 + 3*8) / 4 = 6.5
    np.testing.assert_allclose(mean["w"], [3.25, 6.5])


def test_float32_stays_float32():
    a = {"w": np.ones(3, np.float32)}
    assert weighted_mean([(a, 2.0)])["w"].dtype == np.float32


def test_integer_tensor_keeps_dtype_and_rounds():
    a = {"n": np.array(10, np.int64)}
    b = {"n": np.array(13, np.int64)}
    mean = weighted_mean([(a, 1.0), (b, 1.0)])
    assert mean["n"].dtype == np.int64
    assert int(mean["n"]) == 12  # 11.5 rounds half to even


def test_identical_updates_give_back_the_update():
    update = {"w": np.array([0.1, -0.3], np.float32), "n": np.array(7, np.int64)}
    mean = weighted_mean([(update, 5.0), (update, 2.0), (update, 9.0)])
    np.testing.assert_array_equal(mean["w"], update["w"])
    assert int(mean["n"]) == 7


def test_zero_weight_is_rejected():
    mean = WeightedMean({"w": np.zeros(2)})
    with pytest.raises(ValueError, match="weight must be positive"):
        mean.add({"w": np.zeros(2)}, 0.0)


def test_result_without_weight_raises():
    with pytest.raises(ValueError, match="total weight is zero"):
        WeightedMean({"w": np.zeros(2)}).result()


def test_safetensors_round_trip_keeps_0d_tensors():
    from prifed.core.params import params_from_bytes, params_to_bytes

    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3).T,
              "n": np.array(5, np.int64)}
    restored = params_from_bytes(params_to_bytes(params))
    assert restored["n"].shape == ()
    assert restored["n"].dtype == np.int64
    np.testing.assert_array_equal(restored["w"], params["w"])
