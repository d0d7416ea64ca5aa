"""Command-line options shared by ``prifed simulate`` and ``prifed site``.

Both commands read a site's table with the same column options, so they are
declared once here.
"""

from __future__ import annotations

from typing import Annotated

import typer

LabelOption = Annotated[str | None, typer.Option(help="label column")]
LabelThresholdOption = Annotated[float | None, typer.Option(
    help="a label value >= this is positive (for scores such as 0-4)")]
NumericOption = Annotated[str | None, typer.Option(
    help="comma-separated numeric feature columns (default: detected)")]
CategoricalOption = Annotated[str | None, typer.Option(
    help="comma-separated categorical feature columns (default: detected)")]
DropOption = Annotated[str | None, typer.Option(
    help="comma-separated columns to ignore, such as record ids")]
DropIncompleteOption = Annotated[bool, typer.Option(
    help="drop rows with a missing feature instead of imputing")]


def split_list(values: str | None) -> list[str] | None:
    """Split a comma-separated option into its non-empty items."""
    if values is None:
        return None
    return [v.strip() for v in values.split(",") if v.strip()]
