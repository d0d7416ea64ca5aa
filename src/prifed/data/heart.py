"""The UCI Heart Disease data from four centres, shipped with PriFed.

Preparation follows the FLamby Fed-Heart-Disease benchmark: ten clinical
features, rows with a missing value in them dropped (740 rows remain), label
``num > 0``. Switzerland records a missing cholesterol as 0; that is kept as in
FLamby, so the figures stay comparable.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from prifed.data.tabular import TableSpec

HEART_SITES = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")


def heart_csv_path() -> Path:
    """Return the path of the shipped heart disease CSV."""
    return Path(str(resources.files("prifed.data") / "heart_disease_uci.csv"))


def heart_spec() -> TableSpec:
    """Return the column roles of the heart data in FLamby's protocol."""
    return TableSpec(
        site_column="dataset",
        label="num",
        numeric=["age", "trestbps", "chol", "thalch", "oldpeak"],
        categorical=["sex", "cp", "fbs", "restecg", "exang"],
        drop=["id", "slope", "ca", "thal"],
        label_threshold=1,
        drop_incomplete=True,
    )
