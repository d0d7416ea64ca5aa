"""Read a multi-site CSV, split it per site and check each site can train.

Rows of one site never mix with another's: the table is cut by the site column
first, and every later step (train/test split, statistics) runs per site.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from prifed.errors import DataError

MIN_SITE_ROWS = 4


@dataclass
class TableSpec:
    """How to read a multi-site table: which columns mean what."""

    site_column: str
    label: str
    numeric: list[str] | None = None
    categorical: list[str] | None = None
    drop: list[str] = field(default_factory=list)
    label_threshold: float | None = None
    drop_incomplete: bool = False


@dataclass
class SiteFrames:
    """One site's raw rows, split into train and test."""

    name: str
    train: pd.DataFrame
    test: pd.DataFrame


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV file, with a clear error when it is missing or unreadable."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        table = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path} as CSV: {error}") from None
    if table.empty:
        raise DataError(f"data file {path} has no rows")
    return table


def resolve_features(table: pd.DataFrame, spec: TableSpec) -> tuple[list[str], list[str]]:
    """Return the numeric and categorical feature columns, declared or detected.

    Undeclared columns are numeric when pandas reads them as numbers (booleans
    excepted) and categorical otherwise.
    """
    for role, column in (("site column", spec.site_column), ("label", spec.label)):
        if column not in table.columns:
            raise DataError(f"{role} {column!r} not found; columns are "
                            f"{', '.join(map(str, table.columns))}")
    declared = list(spec.numeric or []) + list(spec.categorical or []) + spec.drop
    unknown = [c for c in declared if c not in table.columns]
    if unknown:
        raise DataError(f"column {unknown[0]!r} not found; columns are "
                        f"{', '.join(map(str, table.columns))}")
    reserved = {spec.site_column, spec.label, *spec.drop}
    if spec.numeric is not None and spec.categorical is not None:
        return list(spec.numeric), list(spec.categorical)
    numeric, categorical = list(spec.numeric or []), list(spec.categorical or [])
    for column in table.columns:
        if column in reserved or column in numeric or column in categorical:
            continue
        series = table[column]
        is_number = (pd.api.types.is_numeric_dtype(series)
                     and not pd.api.types.is_bool_dtype(series))
        if spec.numeric is None and is_number:
            numeric.append(column)
        elif spec.categorical is None and not is_number:
            categorical.append(column)
    if not numeric and not categorical:
        raise DataError("no feature columns left after removing the site, label "
                        "and dropped columns")
    return numeric, categorical


def binary_labels(table: pd.DataFrame, spec: TableSpec) -> pd.Series:
    """Turn the label column into 0/1 by the rule in ``spec``.

    A numeric label with values 0 and 1 only is used as it is; any other numeric
    label needs ``label_threshold`` (positive when value >= threshold).
    """
    raw = table[spec.label]
    if pd.api.types.is_bool_dtype(raw):
        return raw.astype(int)
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna() & raw.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0]) + 2
        raise DataError(f"label {spec.label!r} must be numeric; a non-numeric value "
                        f"is on line {row} of the file")
    if spec.label_threshold is not None:
        return (values >= spec.label_threshold).astype(int).where(values.notna())
    distinct = set(values.dropna().unique())
    if not distinct <= {0, 1}:
        raise DataError(f"label {spec.label!r} has values other than 0 and 1; pass "
                        "a threshold (--label-threshold T makes value >= T positive)")
    return values


def split_sites(table: pd.DataFrame, spec: TableSpec, features: list[str],
                sites: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Cut the table by site, keeping the order in which sites first appear."""
    table = table.copy()
    table["__label__"] = binary_labels(table, spec)
    table = table[table["__label__"].notna()]
    if spec.drop_incomplete:
        table = table.dropna(subset=features)
    names = [str(s) for s in pd.unique(table[spec.site_column].dropna())]
    if sites is not None:
        unknown = [s for s in sites if s not in names]
        if unknown:
            raise DataError(f"site {unknown[0]!r} not found in column "
                            f"{spec.site_column!r}; sites are {', '.join(names)}")
        names = list(sites)
    by_site = {name: table[table[spec.site_column].astype(str) == name]
               for name in names}
    for name, rows in by_site.items():
        check_site(name, rows)
    if len(by_site) < 2:
        raise DataError(f"federated training needs at least 2 sites; column "
                        f"{spec.site_column!r} has {len(by_site)}")
    return by_site


def check_site(name: str, rows: pd.DataFrame) -> None:
    """Check a site has enough rows and both classes."""
    if len(rows) < MIN_SITE_ROWS:
        raise DataError(f"site {name!r} has {len(rows)} usable rows; at least "
                        f"{MIN_SITE_ROWS} are needed")
    classes = rows["__label__"].nunique()
    if classes < 2:
        raise DataError(f"site {name!r} has one class only ({len(rows)} rows, all "
                        f"label {int(rows['__label__'].iloc[0])}); it cannot train "
                        "or be evaluated as a binary task")


def split_train_test(name: str, rows: pd.DataFrame, test_fraction: float,
                     seed: int) -> SiteFrames:
    """Split one site's rows, stratified when both classes have over 2 rows."""
    counts = rows["__label__"].value_counts()
    stratify = rows["__label__"] if (counts > 2).all() and len(counts) == 2 else None
    train, test = train_test_split(rows, test_size=test_fraction, random_state=seed,
                                   shuffle=True, stratify=stratify)
    return SiteFrames(name, train, test)
