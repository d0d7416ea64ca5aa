"""Prepare every site of a simulation: split per site, preprocess federatedly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prifed.data.heart import heart_csv_path, heart_spec
from prifed.data.partition import PartitionSpec, repartition
from prifed.data.preprocess import Preprocessor, build_preprocessors, site_statistics
from prifed.data.tabular import TableSpec, read_table, resolve_features, \
    split_sites, split_train_test
from prifed.errors import ConfigError
from prifed.log import get_logger

logger = get_logger(__name__)


@dataclass
class PreparedSite:
    """One site's model-ready arrays and the preprocessor that made them."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    preprocessor: Preprocessor


def prepare_sites(data: Path | None, spec: TableSpec | None, seed: int,
                  test_fraction: float = 0.34, standardize: str = "federated",
                  sites: list[str] | None = None,
                  partition: PartitionSpec | None = None) -> list[PreparedSite]:
    """Read a table (the shipped heart data by default) and prepare each site.

    With a synthetic ``partition`` the table's rows are pooled and dealt to
    made-up sites first (see :mod:`prifed.data.partition`).
    """
    path = heart_csv_path() if data is None else data
    spec = heart_spec() if spec is None else spec
    table = read_table(path)
    numeric, categorical = resolve_features(table, spec)
    if partition is not None and partition.synthetic:
        if sites is not None:
            raise ConfigError("choosing sites does not apply to a synthetic "
                              "partition, whose sites are made up")
        table, spec = repartition(table, spec, numeric + categorical, partition)
        sites = partition.site_names()
    by_site = split_sites(table, spec, numeric + categorical, sites)
    frames = {name: split_train_test(name, rows, test_fraction, seed)
              for name, rows in by_site.items()}

    # Only aggregates cross sites: counts, sums, sums of squares, category sets.
    stats = {name: site_statistics(name, f.train, numeric, categorical)
             for name, f in frames.items()}
    preprocessors = build_preprocessors(stats, numeric, categorical, standardize)
    prepared = []
    for name, f in frames.items():
        pre = preprocessors[name]
        prepared.append(PreparedSite(
            name, pre.transform(f.train), f.train["__label__"].to_numpy(np.float32),
            pre.transform(f.test), f.test["__label__"].to_numpy(np.float32), pre))
        logger.info("data: site %s has %d train and %d test rows, %d features",
                    name, len(f.train), len(f.test), len(pre.feature_names))
    return prepared
