"""The statistics a site shares before round 1, as the coordinator validates them.

Only aggregates of a site's training rows: the row count, per numeric column
its count, sum and sum of squared deviations from the site's mean, and per
categorical column the set of levels present. The coordinator merges them
into the shared preprocessor.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prifed.deploy.errors import RequestRejected


class StatisticsBody(BaseModel):
    """A site's statistics as the coordinator validates them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    num_rows: int = Field(ge=0)
    numeric: list[str] = Field(max_length=10_000)
    categorical: list[str] = Field(max_length=10_000)
    count: dict[str, int]
    total: dict[str, float]
    squared_deviations: dict[str, float]
    levels: dict[str, list[str]]
    fhir_spec_hash: str | None = None
    """Hash of the FHIR feature spec a site built its table with, if any."""


def parse_statistics(site: str, body: bytes) -> StatisticsBody:
    """Validate one site's statistics; raise 422 naming the field at fault."""
    try:
        stats = StatisticsBody.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise RequestRejected(422, "invalid_statistics",
                              f"statistics of site {site!r}: field {where!r}: "
                              f"{first['msg']}") from None
    if stats.site != site:
        raise RequestRejected(422, "invalid_statistics",
                              f"statistics name site {stats.site!r} but were sent by "
                              f"site {site!r}")
    for field_name in ("count", "total", "squared_deviations"):
        keys = set(getattr(stats, field_name))
        if keys != set(stats.numeric):
            raise RequestRejected(422, "invalid_statistics",
                                  f"statistics of site {site!r}: {field_name} must "
                                  "have one entry per numeric column")
    for column in stats.numeric:
        values = (stats.count[column], stats.total[column],
                  stats.squared_deviations[column])
        if not all(math.isfinite(v) for v in values) or stats.count[column] < 0 \
                or stats.squared_deviations[column] < 0:
            raise RequestRejected(422, "invalid_statistics",
                                  f"statistics of site {site!r}: column {column!r} "
                                  "must have a count >= 0 and finite sums")
    if set(stats.levels) != set(stats.categorical):
        raise RequestRejected(422, "invalid_statistics",
                              f"statistics of site {site!r}: levels must have one "
                              "entry per categorical column")
    return stats


def to_site_statistics(stats: StatisticsBody) -> Any:
    """Convert validated statistics to the preprocessing module's SiteStatistics."""
    from prifed.data.preprocess import SiteStatistics

    return SiteStatistics(stats.site, stats.num_rows, dict(stats.count),
                          dict(stats.total), dict(stats.squared_deviations),
                          {k: list(v) for k, v in stats.levels.items()})
