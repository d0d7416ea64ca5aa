"""Synthetic partitions: new sites cut from pooled rows, for experiments only.

A natural split keeps each hospital's rows together; these partitioners pool
every usable row and deal them out again to made-up sites, to study a kind
of heterogeneity in isolation:

- ``iid``: rows dealt uniformly at random;
- ``dirichlet`` (label skew): for each class, the share of its rows at each
  site is drawn from Dirichlet(alpha); small alpha gives sites dominated by
  one class (alpha 0.1 is extreme, 100 nearly iid);
- ``quantity`` (quantity skew): site sizes drawn from Dirichlet(alpha), rows
  dealt at random, so label mixes stay similar but sizes differ.

Every site first receives ``min_per_class`` rows of each class, so it can
train and be evaluated as a binary task; the skewed draw deals the rest.
Site names start with ``synthetic-`` and every report built on them says
the split is synthetic: results on it say nothing about real hospitals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from prifed.data.tabular import TableSpec, binary_labels
from prifed.errors import ConfigError, DataError

PARTITIONS = ("natural", "iid", "dirichlet", "quantity")
SYNTHETIC_SITE_COLUMN = "__synthetic_site__"


@dataclass(frozen=True)
class PartitionSpec:
    """Which partition to draw: kind, number of sites, concentration, seed."""

    kind: str = "natural"
    num_sites: int = 4
    alpha: float = 0.5
    min_per_class: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PARTITIONS:
            raise ConfigError(f"partition must be one of {', '.join(PARTITIONS)}; "
                              f"got {self.kind!r}")
        if self.num_sites < 2:
            raise ConfigError(f"partition sites must be at least 2; got "
                              f"{self.num_sites}")
        if not self.alpha > 0:
            raise ConfigError(f"partition alpha must be positive; got {self.alpha}")
        if self.min_per_class < 1:
            raise ConfigError("min_per_class must be at least 1; got "
                              f"{self.min_per_class}")

    @property
    def synthetic(self) -> bool:
        """Tell whether the sites are made up rather than the table's own."""
        return self.kind != "natural"

    def describe(self) -> str:
        """Return a one-line description for reports."""
        if not self.synthetic:
            return "natural split: one site per value of the site column"
        detail = {"iid": "rows dealt uniformly",
                  "dirichlet": f"label skew, Dirichlet alpha {self.alpha}",
                  "quantity": f"quantity skew, Dirichlet alpha {self.alpha}"}
        return (f"SYNTHETIC split into {self.num_sites} made-up sites "
                f"({detail[self.kind]}, seed {self.seed}); not real hospitals")

    def site_names(self) -> list[str]:
        """Return the names of the made-up sites."""
        return [f"synthetic-{i + 1}" for i in range(self.num_sites)]


def assign_sites(labels: np.ndarray, spec: PartitionSpec) -> np.ndarray:
    """Return the site index (0 to num_sites - 1) of every row under ``spec``."""
    labels = np.asarray(labels).astype(int)
    rng = np.random.default_rng(spec.seed)
    classes = np.unique(labels)
    if classes.size < 2:
        raise DataError("a synthetic partition needs both classes; the rows hold "
                        f"only label {classes[0] if classes.size else 'none'}")
    sites = np.full(labels.size, -1, dtype=np.int64)
    rest = []
    for label in classes:
        rows = rng.permutation(np.flatnonzero(labels == label))
        reserved = spec.num_sites * spec.min_per_class
        if rows.size < reserved:
            raise DataError(f"class {label} has {rows.size} rows; {spec.num_sites} "
                            f"sites with {spec.min_per_class} rows of each class "
                            f"need {reserved}")
        sites[rows[:reserved]] = np.repeat(np.arange(spec.num_sites),
                                           spec.min_per_class)
        rest.append(rows[reserved:])
    if spec.kind == "dirichlet":
        for rows in rest:
            shares = rng.dirichlet(np.full(spec.num_sites, spec.alpha))
            sites[rows] = _deal(rows.size, shares, rng)
    else:
        remaining = rng.permutation(np.concatenate(rest))
        if spec.kind == "quantity":
            shares = rng.dirichlet(np.full(spec.num_sites, spec.alpha))
        else:
            shares = np.full(spec.num_sites, 1.0 / spec.num_sites)
        sites[remaining] = _deal(remaining.size, shares, rng)
    return sites


def _deal(count: int, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return ``count`` site indices in proportions ``shares``, shuffled."""
    sizes = np.floor(shares * count).astype(int)
    # Hand the rows lost to rounding to the sites with the largest remainders.
    leftover = count - int(sizes.sum())
    order = np.argsort(-(shares * count - sizes), kind="stable")
    sizes[order[:leftover]] += 1
    return rng.permutation(np.repeat(np.arange(shares.size), sizes))


def repartition(table: pd.DataFrame, spec: TableSpec, features: Sequence[str],
                partition: PartitionSpec) -> tuple[pd.DataFrame, TableSpec]:
    """Deal a table's usable rows to synthetic sites; return the table and spec.

    Rows without a label, and rows with a missing feature when the spec drops
    incomplete rows, are removed first, as the natural split would. The new
    site column replaces the table's own.
    """
    if not partition.synthetic:
        return table, spec
    usable = table.copy()
    labels = binary_labels(usable, spec)
    keep = labels.notna()
    if spec.drop_incomplete:
        keep &= usable[list(features)].notna().all(axis=1)
    usable = usable[keep.to_numpy()]
    indices = assign_sites(labels[keep].to_numpy(), partition)
    names = np.array(partition.site_names())
    usable[SYNTHETIC_SITE_COLUMN] = names[indices]
    new_spec = TableSpec(SYNTHETIC_SITE_COLUMN, spec.label, spec.numeric,
                         spec.categorical, [*spec.drop, spec.site_column],
                         spec.label_threshold, spec.drop_incomplete)
    return usable, new_spec
