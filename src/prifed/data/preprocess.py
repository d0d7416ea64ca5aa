"""Federated preprocessing: statistics per site, merged without pooling rows.

Each site computes, per numeric training column, the count, the sum and the sum
of squared deviations from its own mean, and per categorical column the set of
categories it holds. The coordinator merges those aggregates into one
standardiser and one vocabulary with the parallel variance formula of Chan,
Golub and LeVeque, which stays exact for values with a large offset; no row
leaves its site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from prifed.errors import ConfigError

MISSING_LEVEL = "(missing)"
STANDARDIZE_MODES = ("federated", "site")


@dataclass
class SiteStatistics:
    """Aggregates one site shares about its training rows: no row values."""

    site: str
    num_rows: int
    count: dict[str, int] = field(default_factory=dict)
    total: dict[str, float] = field(default_factory=dict)
    squared_deviations: dict[str, float] = field(default_factory=dict)
    """Per column, the sum of squared deviations from the site's own mean."""
    levels: dict[str, list[str]] = field(default_factory=dict)


def site_statistics(site: str, rows: pd.DataFrame, numeric: Sequence[str],
                    categorical: Sequence[str]) -> SiteStatistics:
    """Compute one site's shareable statistics from its training rows."""
    stats = SiteStatistics(site, len(rows))
    for column in numeric:
        values = pd.to_numeric(rows[column], errors="coerce").dropna().to_numpy(float)
        stats.count[column] = int(values.size)
        stats.total[column] = float(values.sum())
        mean = values.mean() if values.size else 0.0
        stats.squared_deviations[column] = float(np.square(values - mean).sum())
    for column in categorical:
        stats.levels[column] = sorted(set(category_strings(rows[column])))
    return stats


def category_strings(series: pd.Series) -> list[str]:
    """Return a categorical column as strings, missing values as their own level."""
    return [MISSING_LEVEL if pd.isna(v) else str(v) for v in series]


@dataclass
class Preprocessor:
    """Turns raw rows into standardised float32 features, the same at every site."""

    numeric: list[str]
    categorical: list[str]
    means: dict[str, float]
    stds: dict[str, float]
    vocabulary: dict[str, list[str]]

    @property
    def feature_names(self) -> list[str]:
        names = list(self.numeric)
        for column in self.categorical:
            names += [f"{column}={level}" for level in self.vocabulary[column][1:]]
        return names

    def transform(self, rows: pd.DataFrame) -> np.ndarray:
        """Standardise numeric columns (missing become the mean) and one-hot the rest.

        The first level of each categorical column is the reference and gets no
        column; a level the vocabulary lacks encodes as all zeros.
        """
        blocks = []
        for column in self.numeric:
            values = pd.to_numeric(rows[column], errors="coerce").to_numpy(float)
            values = np.where(np.isnan(values), self.means[column], values)
            blocks.append(((values - self.means[column]) / self.stds[column])[:, None])
        for column in self.categorical:
            levels = self.vocabulary[column][1:]
            strings = np.array(category_strings(rows[column]), dtype=object)
            blocks.append(np.stack([strings == level for level in levels], axis=1)
                          if levels else np.zeros((len(rows), 0)))
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def to_dict(self) -> dict[str, object]:
        return {"numeric": self.numeric, "categorical": self.categorical,
                "means": self.means, "stds": self.stds, "vocabulary": self.vocabulary}


def merge_statistics(stats: Sequence[SiteStatistics], numeric: Sequence[str],
                     categorical: Sequence[str]) -> Preprocessor:
    """Merge per-site statistics into one federation-wide preprocessor."""
    means, stds = {}, {}
    for column in numeric:
        count = sum(s.count[column] for s in stats)
        if count == 0:
            means[column], stds[column] = 0.0, 1.0
            continue
        mean = sum(s.total[column] for s in stats) / count
        spread = 0.0
        for s in stats:
            if s.count[column]:
                site_mean = s.total[column] / s.count[column]
                spread += (s.squared_deviations[column]
                           + s.count[column] * (site_mean - mean) ** 2)
        means[column] = mean
        stds[column] = _safe_std(spread / count)
    vocabulary = {column: sorted({lvl for s in stats for lvl in s.levels[column]})
                  for column in categorical}
    return Preprocessor(list(numeric), list(categorical), means, stds, vocabulary)


def site_preprocessor(federation: Preprocessor, own: SiteStatistics) -> Preprocessor:
    """Standardise with the site's own mean and std, keeping the shared vocabulary."""
    means, stds = {}, {}
    for column in federation.numeric:
        count = own.count[column]
        if count == 0:
            means[column], stds[column] = 0.0, 1.0
            continue
        means[column] = own.total[column] / count
        stds[column] = _safe_std(own.squared_deviations[column] / count)
    return Preprocessor(federation.numeric, federation.categorical, means, stds,
                        federation.vocabulary)


def build_preprocessors(stats: Mapping[str, SiteStatistics], numeric: Sequence[str],
                        categorical: Sequence[str], mode: str
                        ) -> dict[str, Preprocessor]:
    """Return each site's preprocessor for a standardisation mode."""
    if mode not in STANDARDIZE_MODES:
        raise ConfigError(f"standardize must be one of {', '.join(STANDARDIZE_MODES)}; "
                          f"got {mode!r}")
    federation = merge_statistics(list(stats.values()), numeric, categorical)
    if mode == "federated":
        return {site: federation for site in stats}
    return {site: site_preprocessor(federation, s) for site, s in stats.items()}


def _safe_std(variance: float) -> float:
    """Return the standard deviation, or 1.0 for a constant column."""
    std = float(np.sqrt(max(variance, 0.0)))
    return std if std > 0.0 else 1.0
