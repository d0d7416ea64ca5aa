"""Read a multi-site CSV, split it per site and check each site can train.

Rows of one site never mix with another's: the table is cut by the site column
first, and every later step (train/test split, statistics) runs per site.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from prifed.errors import DataError
from prifed.log import get_logger

logger = get_logger(__name__)

MIN_SITE_ROWS = 4
NUMERIC_SHARE = 0.9
"""Share of parsable values above which a text column counts as numbers with
a few mistyped values."""
MAX_LEVELS = 50
IDENTIFIER_SHARE = 0.2
"""A categorical column with over MAX_LEVELS levels and over this share of
distinct values per row looks like an identifier."""


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
    """Read a CSV file, detecting its delimiter, with clear errors.

    Comma, semicolon, tab and pipe are recognised from the first lines. A
    header that names a column twice is an error, not a silent rename.
    """
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected a CSV file")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            sample = handle.read(65536)
    except UnicodeDecodeError:
        sample = path.read_bytes()[:65536].decode("latin-1")
    delimiter = _detect_delimiter(sample)
    header = next(csv.reader(io.StringIO(sample), delimiter=delimiter), [])
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"column {repeated[0]!r} appears more than once in the "
                        f"header of {path}; give each column a unique name")
    try:
        table = pd.read_csv(path, sep=delimiter)
    except (pd.errors.ParserError, pd.errors.EmptyDataError,
            UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path} as CSV: {error}") from None
    if table.empty:
        raise DataError(f"data file {path} has no rows")
    return table


def _detect_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def resolve_features(table: pd.DataFrame,
                     spec: TableSpec) -> tuple[list[str], list[str]]:
    """Return the numeric and categorical feature columns, declared or detected.

    Undeclared columns are numeric when their values are numbers (booleans
    excepted) and categorical otherwise. A column that is mostly numbers with
    some text, a declared numeric column with text, an empty column, or a
    categorical column with so many levels that it looks like an identifier is
    an error naming the column.
    """
    _check_declared(table, spec)
    reserved = {spec.site_column, spec.label, *spec.drop}
    numeric, categorical = list(spec.numeric or []), list(spec.categorical or [])
    for column in table.columns:
        if column in reserved or column in numeric or column in categorical:
            continue
        if _looks_numeric(table[column], column):
            if spec.numeric is None:
                numeric.append(column)
        elif spec.categorical is None:
            categorical.append(column)
    if not numeric and not categorical:
        raise DataError("no feature columns left after removing the site, label "
                        "and dropped columns")
    for column in numeric:
        _check_numeric(table[column], column)
    for column in numeric + categorical:
        if table[column].isna().all():
            raise DataError(f"column {column!r} has no values in any row; --drop it")
        if table[column].nunique(dropna=True) == 1:
            logger.warning("data: column %s has one value in every row; it carries "
                           "no information", column)
    for column in categorical:
        _check_levels(table[column], column)
    return numeric, categorical


def _check_declared(table: pd.DataFrame, spec: TableSpec) -> None:
    columns = ", ".join(map(str, table.columns))
    for role, column in (("site column", spec.site_column), ("label", spec.label)):
        if column not in table.columns:
            raise DataError(f"{role} {column!r} not found; columns are {columns}")
    declared = list(spec.numeric or []) + list(spec.categorical or []) + spec.drop
    unknown = [c for c in declared if c not in table.columns]
    if unknown:
        raise DataError(f"column {unknown[0]!r} not found; columns are {columns}")
    for role, column in (("site column", spec.site_column), ("label", spec.label)):
        if column in declared:
            raise DataError(f"the {role} {column!r} cannot also be a feature or "
                            "be dropped")
    both = set(spec.numeric or []) & set(spec.categorical or [])
    if both:
        raise DataError(f"column {sorted(both)[0]!r} is declared both numeric and "
                        "categorical")


def _looks_numeric(series: pd.Series, column: str) -> bool:
    if pd.api.types.is_bool_dtype(series):
        return False
    if pd.api.types.is_numeric_dtype(series):
        return True
    present = series.dropna()
    if present.map(lambda value: isinstance(value, (bool, np.bool_))).any():
        return False  # true/false with gaps: pandas keeps it as objects
    parsed = pd.to_numeric(present, errors="coerce")
    if len(present) and parsed.notna().mean() >= NUMERIC_SHARE:
        line = _first_text_line(series)
        raise DataError(f"column {column!r} is mostly numbers but line {line} contains "
                        "text; correct the value, or declare the column with "
                        "--categorical")
    return False


def _check_numeric(series: pd.Series, column: str) -> None:
    if pd.api.types.is_bool_dtype(series):
        raise DataError(f"column {column!r} is declared numeric but holds "
                        "true/false values; declare it with --categorical")
    if pd.api.types.is_numeric_dtype(series):
        return
    line = _first_text_line(series)
    if line is not None:
        raise DataError(f"column {column!r} is declared numeric but line {line} "
                        "contains text; correct the value or leave the cell empty")


def _first_text_line(series: pd.Series) -> int | None:
    """Return the file line (header is line 1) of the first non-numeric value."""
    parsed = pd.to_numeric(series, errors="coerce")
    bad = np.flatnonzero((parsed.isna() & series.notna()).to_numpy())
    return int(bad[0]) + 2 if bad.size else None


def _check_levels(series: pd.Series, column: str) -> None:
    levels = series.nunique(dropna=True)
    if levels > MAX_LEVELS and levels > IDENTIFIER_SHARE * series.notna().sum():
        raise DataError(f"column {column!r} has {levels} distinct values in "
                        f"{series.notna().sum()} rows, like an identifier or free "
                        "text; its values would be shared in the vocabulary, so "
                        "--drop it or declare it with --numeric")


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
        if not math.isfinite(spec.label_threshold):
            raise DataError("label threshold must be a finite number; got "
                            f"{spec.label_threshold}")
        return (values >= spec.label_threshold).astype(int).where(values.notna())
    distinct = set(values.dropna().unique())
    if not distinct <= {0, 1}:
        raise DataError(f"label {spec.label!r} has values other than 0 and 1; pass "
                        "a threshold (--label-threshold T makes value >= T positive)")
    return values


def site_names(series: pd.Series) -> pd.Series:
    """Return site names as text; whole numbers read as floats lose their ".0"."""
    if pd.api.types.is_float_dtype(series):
        present = series.dropna()
        if (present == present.round()).all():
            return series.astype("Int64").astype(str).where(series.notna())
    return series.astype(str).where(series.notna())


def label_sites(table: pd.DataFrame, spec: TableSpec,
                features: list[str]) -> tuple[pd.DataFrame, pd.Series]:
    """Add site names and 0/1 labels; return the table and its usable rows.

    A row is usable when it has a site and a label (and, with
    ``drop_incomplete``, every feature).
    """
    table = table.copy()
    table["__site__"] = site_names(table[spec.site_column])
    table["__label__"] = binary_labels(table, spec)
    usable = table["__site__"].notna() & table["__label__"].notna()
    if spec.drop_incomplete:
        usable &= table[features].notna().all(axis=1)
    return table, usable


def site_rows(table: pd.DataFrame, usable: pd.Series, spec: TableSpec,
              name: str) -> pd.DataFrame:
    """Return one site's usable rows, counting the dropped ones.

    A site left with no usable rows, too few rows or one class is an error
    naming it.
    """
    at_site = table["__site__"] == name
    rows = table[at_site & usable]
    dropped = int(at_site.sum()) - len(rows)
    reason = "missing label" + (" or feature" if spec.drop_incomplete else "")
    if dropped:
        logger.warning("data: site %s: %d of %d rows dropped (%s)", name, dropped,
                       int(at_site.sum()), reason)
    if rows.empty:
        raise DataError(f"site {name!r} has no usable rows: all "
                        f"{int(at_site.sum())} have a {reason}")
    check_site(name, rows)
    return rows


def split_sites(table: pd.DataFrame, spec: TableSpec, features: list[str],
                sites: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Cut the table by site, keeping the order in which sites first appear.

    Rows without a label (and, with ``drop_incomplete``, rows with a missing
    feature) are dropped and counted per site. A site left with no usable
    rows is an error naming it.
    """
    table, usable = label_sites(table, spec, features)
    all_names = [str(s) for s in pd.unique(table["__site__"].dropna())]
    if sites is not None:
        unknown = [s for s in sites if s not in all_names]
        if unknown:
            raise DataError(f"site {unknown[0]!r} not found in column "
                            f"{spec.site_column!r}; sites are {', '.join(all_names)}")
        names = list(dict.fromkeys(sites))
    else:
        names = all_names
    if len(names) < 2:
        raise DataError(f"federated training needs at least 2 sites; {len(names)} "
                        f"selected of the {len(all_names)} in column "
                        f"{spec.site_column!r}")
    return {name: site_rows(table, usable, spec, name) for name in names}


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
    # Imported here because scikit-learn takes about a second to import, which
    # `prifed --help` and the deployment commands should not pay.
    from sklearn.model_selection import train_test_split

    counts = rows["__label__"].value_counts()
    stratify = rows["__label__"] if (counts > 2).all() and len(counts) == 2 else None
    train, test = train_test_split(rows, test_size=test_fraction, random_state=seed,
                                   shuffle=True, stratify=stratify)
    return SiteFrames(name, train, test)
