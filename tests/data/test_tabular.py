"""Reading a user's table: delimiters, column roles and clear errors."""

import numpy as np
import pandas as pd
import pytest

from prifed.data.tabular import TableSpec, read_table, resolve_features, split_sites
from prifed.errors import DataError


def table(**extra):
    rows = 24
    base = {"site": ["a"] * 12 + ["b"] * 12,
            "age": np.arange(rows, dtype=float) + 30,
            "sex": ["F", "M"] * 12,
            "y": [0, 1, 1, 0] * 6}
    base.update(extra)
    return pd.DataFrame(base)


SPEC = TableSpec("site", "y")


def test_semicolon_file_is_read(tmp_path):
    path = tmp_path / "semi.csv"
    table().to_csv(path, sep=";", index=False)
    assert list(read_table(path).columns) == ["site", "age", "sex", "y"]


def test_duplicate_header_is_named(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("site,age,age,y\na,1,2,0\n")
    with pytest.raises(DataError, match="column 'age' appears more than once"):
        read_table(path)


def test_directory_is_named(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        read_table(tmp_path)


def test_mostly_numeric_column_with_text_names_line():
    bp = [120.0 + i for i in range(24)]
    frame = table(bp=bp)
    frame["bp"] = frame["bp"].astype(object)
    frame.loc[5, "bp"] = "high"
    with pytest.raises(DataError, match="column 'bp' is mostly numbers but line 7"):
        resolve_features(frame, SPEC)


def test_declared_numeric_with_text_names_line():
    frame = table(code=["x"] + ["1"] * 23)
    spec = TableSpec("site", "y", numeric=["age", "code"])
    with pytest.raises(DataError, match="column 'code' is declared numeric but line 2"):
        resolve_features(frame, spec)


@pytest.mark.parametrize("spec, message", [
    (TableSpec("site", "y", numeric=["age", "y"]), "label 'y' cannot also"),
    (TableSpec("site", "y", categorical=["site"]), "site column 'site' cannot"),
    (TableSpec("site", "y", drop=["y"]), "label 'y' cannot also"),
    (TableSpec("site", "y", numeric=["age"], categorical=["age", "sex"]),
     "declared both numeric and categorical"),
])
def test_conflicting_roles_are_rejected(spec, message):
    with pytest.raises(DataError, match=message):
        resolve_features(table(), spec)


def test_empty_column_is_rejected():
    with pytest.raises(DataError, match="column 'lab' has no values"):
        resolve_features(table(lab=[np.nan] * 24), SPEC)


def test_identifier_like_column_is_rejected():
    frame = pd.concat([table()] * 4, ignore_index=True)
    frame["mrn"] = [f"MRN{i:05d}" for i in range(len(frame))]
    with pytest.raises(DataError, match="column 'mrn' has 96 distinct values"):
        resolve_features(frame, SPEC)


def test_site_with_no_usable_rows_is_named():
    frame = table()
    frame["y"] = frame["y"].astype(float)
    frame.loc[frame["site"] == "b", "y"] = np.nan
    frame = pd.concat([frame, table().assign(site="c")], ignore_index=True)
    numeric, categorical = resolve_features(frame, SPEC)
    with pytest.raises(DataError, match="site 'b' has no usable rows: all 12"):
        split_sites(frame, SPEC, numeric + categorical)


def test_dropped_rows_are_counted(caplog):
    frame = table()
    frame["y"] = frame["y"].astype(float)
    frame.loc[0, "y"] = np.nan
    by_site = split_sites(frame, SPEC, ["age", "sex"])
    assert len(by_site["a"]) == 11
    assert "site a: 1 of 12 rows dropped" in caplog.text


def test_whole_number_site_ids_lose_float_suffix():
    frame = table()
    frame["site"] = [1.0] * 12 + [2.0] * 11 + [np.nan]
    by_site = split_sites(frame, SPEC, ["age", "sex"], sites=["1", "2"])
    assert list(by_site) == ["1", "2"]


def test_single_selected_site_is_explained():
    with pytest.raises(DataError, match="1 selected of the 2"):
        split_sites(table(), SPEC, ["age", "sex"], sites=["a"])


def test_nan_threshold_is_rejected():
    spec = TableSpec("site", "y", label_threshold=float("nan"))
    with pytest.raises(DataError, match="label threshold must be a finite"):
        split_sites(table(), spec, ["age", "sex"])
