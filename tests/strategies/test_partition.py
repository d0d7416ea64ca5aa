"""Synthetic partitions: label skew, quantity skew and their labelling."""

import numpy as np
import pytest

from prifed.data.partition import PartitionSpec, assign_sites
from prifed.errors import ConfigError, DataError
from prifed.sitedata import prepare_sites

LABELS = np.array([0] * 300 + [1] * 200)


def positive_shares(sites, labels, num_sites):
    return np.array([labels[sites == s].mean() for s in range(num_sites)])


def test_every_row_gets_one_site_with_both_classes():
    spec = PartitionSpec("dirichlet", num_sites=5, alpha=0.1, min_per_class=3, seed=1)
    sites = assign_sites(LABELS, spec)
    assert sites.shape == LABELS.shape
    assert sites.min() == 0
    assert sites.max() == 4
    for site in range(5):
        for label in (0, 1):
            assert ((sites == site) & (LABELS == label)).sum() >= 3


def test_small_alpha_skews_labels_more():
    def spread(alpha):
        values = []
        for seed in range(5):
            spec = PartitionSpec("dirichlet", 4, alpha, seed=seed)
            sites = assign_sites(LABELS, spec)
            values.append(np.abs(positive_shares(sites, LABELS, 4) - 0.4).mean())
        return np.mean(values)

    assert spread(0.1) > 2 * spread(100.0)
    assert spread(100.0) < 0.1


def test_quantity_skew_keeps_label_mix_and_varies_sizes():
    sites = assign_sites(LABELS, PartitionSpec("quantity", 4, alpha=0.5, seed=3))
    sizes = np.bincount(sites, minlength=4)
    assert sizes.max() > 3 * sizes.min()
    iid = np.bincount(assign_sites(LABELS, PartitionSpec("iid", 4, seed=3)))
    assert iid.max() - iid.min() <= 2


def test_partition_is_deterministic_by_seed():
    spec = PartitionSpec("dirichlet", 4, 0.5, seed=7)
    first, second = assign_sites(LABELS, spec), assign_sites(LABELS, spec)
    np.testing.assert_array_equal(first, second)
    other = assign_sites(LABELS, PartitionSpec("dirichlet", 4, 0.5, seed=8))
    assert not np.array_equal(assign_sites(LABELS, spec), other)


def test_too_few_rows_per_class_is_an_error():
    with pytest.raises(DataError, match="class 1 has 5 rows"):
        assign_sites(np.array([0] * 50 + [1] * 5), PartitionSpec("iid", 4))


@pytest.mark.parametrize("field, value", [("kind", "random"), ("num_sites", 1),
                                          ("alpha", 0.0)])
def test_bad_partition_setting(field, value):
    with pytest.raises(ConfigError):
        PartitionSpec(**{field: value})


def test_heart_rows_dealt_to_synthetic_sites():
    spec = PartitionSpec("dirichlet", num_sites=3, alpha=0.3, seed=2)
    sites = prepare_sites(None, None, seed=42, partition=spec)
    assert [s.name for s in sites] == ["synthetic-1", "synthetic-2", "synthetic-3"]
    # 740 usable heart rows, all dealt, none twice.
    assert sum(s.train_y.size + s.test_y.size for s in sites) == 740
    assert "SYNTHETIC" in spec.describe()
    assert "not real hospitals" in spec.describe()
    with pytest.raises(ConfigError, match="made up"):
        prepare_sites(None, None, seed=42, sites=["Hungary"], partition=spec)
