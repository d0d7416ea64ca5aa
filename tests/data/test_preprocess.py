"""Federated preprocessing gives what pooled statistics would, without pooling."""

import numpy as np
import pandas as pd
import pytest

from prifed.data.preprocess import (build_preprocessors, merge_statistics,
                                    site_statistics)
from prifed.errors import ConfigError


def frames():
    a = pd.DataFrame({"x": [1.0, 2.0, np.nan, 4.0], "c": ["u", "v", None, "u"]})
    b = pd.DataFrame({"x": [10.0, 20.0, 30.0], "c": ["w", "u", "u"]})
    return {"a": a, "b": b}


def test_merged_mean_and_std_match_concatenated_columns():
    stats = [site_statistics(n, f, ["x"], ["c"]) for n, f in frames().items()]
    merged = merge_statistics(stats, ["x"], ["c"])
    values = np.array([1.0, 2.0, 4.0, 10.0, 20.0, 30.0])
    assert merged.means["x"] == pytest.approx(values.mean())
    assert merged.stds["x"] == pytest.approx(values.std())


def test_vocabulary_is_union_of_site_levels_with_missing():
    stats = [site_statistics(n, f, ["x"], ["c"]) for n, f in frames().items()]
    merged = merge_statistics(stats, ["x"], ["c"])
    assert merged.vocabulary["c"] == ["(missing)", "u", "v", "w"]
    assert merged.feature_names == ["x", "c=u", "c=v", "c=w"]


def test_transform_imputes_mean_and_one_hots():
    stats = [site_statistics(n, f, ["x"], ["c"]) for n, f in frames().items()]
    merged = merge_statistics(stats, ["x"], ["c"])
    out = merged.transform(frames()["a"])
    assert out.dtype == np.float32
    assert out[2, 0] == pytest.approx(0.0)  # missing x becomes the mean
    np.testing.assert_array_equal(out[:, 1:], [[1, 0, 0], [0, 1, 0], [0, 0, 0],
                                               [1, 0, 0]])


def test_site_mode_uses_each_site_own_statistics():
    stats = {n: site_statistics(n, f, ["x"], ["c"]) for n, f in frames().items()}
    pre = build_preprocessors(stats, ["x"], ["c"], "site")
    assert pre["b"].means["x"] == pytest.approx(20.0)
    assert pre["a"].means["x"] == pytest.approx(7.0 / 3.0)
    assert pre["a"].vocabulary == pre["b"].vocabulary


def test_unknown_mode_is_config_error():
    stats = {n: site_statistics(n, f, ["x"], []) for n, f in frames().items()}
    with pytest.raises(ConfigError, match="standardize must be one of"):
        build_preprocessors(stats, ["x"], [], "global")


def test_large_offset_keeps_exact_std():
    rng = np.random.default_rng(0)
    values = 1.7e9 + rng.uniform(0, 1, size=200)
    a = pd.DataFrame({"t": values[:120]})
    b = pd.DataFrame({"t": values[120:]})
    stats = [site_statistics("a", a, ["t"], []), site_statistics("b", b, ["t"], [])]
    merged = merge_statistics(stats, ["t"], [])
    assert merged.stds["t"] == pytest.approx(values.std(), rel=1e-6)
