"""A site's own rows, prepared exactly as the simulation prepares that site.

The site reads its CSV, keeps its rows (by the site column, when the file
contains several sites), splits them with the federation's seed and computes
the statistics that leave the site: counts, sums, squared deviations and category
sets. After the coordinator merges every site's statistics, the site builds
its features and its :class:`~prifed.training.client.SiteClient` from the
preprocessor the coordinator sends back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prifed.data.heart import heart_csv_path, heart_spec
from prifed.data.preprocess import Preprocessor, site_statistics
from prifed.data.tabular import SiteFrames, TableSpec, label_sites, read_table, \
    resolve_features, site_rows, split_train_test
from prifed.errors import DataError
from prifed.log import get_logger
from prifed.training.client import SiteClient
from prifed.training.models import build_model

logger = get_logger(__name__)

SITE_COLUMN = "__site_of_file__"


@dataclass
class SiteRows:
    """One site's usable rows and its feature columns, before the split."""

    name: str
    rows: pd.DataFrame
    numeric: list[str]
    categorical: list[str]


@dataclass
class TableSource:
    """Where a site's rows come from: a CSV and how to read it.

    With ``spec.site_column`` the file may contain several sites, and only
    rows whose site column equals the site's name are used. With an empty
    ``site_column`` every row belongs to the site.
    """

    path: Path | None
    spec: TableSpec | None

    def load(self, site: str) -> SiteRows:
        """Read the CSV and keep this site's usable rows.

        The steps are those of :func:`prifed.data.tabular.split_sites` for one
        site, so a site's rows equal the simulation's rows of that site.
        """
        path = heart_csv_path() if self.path is None else self.path
        spec = heart_spec() if self.spec is None else self.spec
        table = read_table(path)
        if not spec.site_column:
            table = table.assign(**{SITE_COLUMN: site})
            spec = TableSpec(SITE_COLUMN, spec.label, spec.numeric, spec.categorical,
                             spec.drop, spec.label_threshold, spec.drop_incomplete)
        numeric, categorical = resolve_features(table, spec)
        table, usable = label_sites(table, spec, numeric + categorical)
        if not (table["__site__"] == site).any():
            present = ", ".join(sorted(table["__site__"].dropna().unique())[:10])
            raise DataError(f"no rows for site {site!r} in column "
                            f"{spec.site_column!r} of {path}; values there: {present}")
        rows = site_rows(table, usable, spec, site)
        return SiteRows(site, rows, numeric, categorical)


def split_rows(rows: SiteRows, seed: int, test_fraction: float) -> SiteFrames:
    """Split a site's rows into train and test with the federation's seed."""
    return split_train_test(rows.name, rows.rows, test_fraction, seed)


def statistics_body(rows: SiteRows, frames: SiteFrames) -> dict[str, Any]:
    """Return the statistics this site shares: aggregates of its training rows."""
    stats = site_statistics(rows.name, frames.train, rows.numeric, rows.categorical)
    body = asdict(stats)
    body["numeric"] = rows.numeric
    body["categorical"] = rows.categorical
    return body


def build_client(rows: SiteRows, setup: dict[str, Any]) -> SiteClient:
    """Build the site's trainer from the coordinator's setup block.

    ``setup`` carries the federation seed and test fraction (for the split),
    the model name and seed, the site's client seed and its preprocessor.
    """
    frames = split_rows(rows, int(setup["seed"]), float(setup["test_fraction"]))
    preprocessor = Preprocessor(**setup["preprocessor"])
    num_features = len(preprocessor.feature_names)
    model_name, model_seed = str(setup["model"]), int(setup["model_seed"])

    def factory() -> Any:
        return build_model(model_name, num_features, model_seed)

    return SiteClient(rows.name, factory, preprocessor.transform(frames.train),
                      frames.train["__label__"].to_numpy(np.float32),
                      preprocessor.transform(frames.test),
                      frames.test["__label__"].to_numpy(np.float32),
                      int(setup["client_seed"]))
