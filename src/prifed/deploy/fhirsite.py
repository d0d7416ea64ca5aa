"""FHIR records as a deployed site's data, bound to the federation's feature spec.

``prifed site --fhir DIR --fhir-spec SPEC`` builds the site's table with
:func:`prifed.fhir.load_site_table` (the ``site`` column dropped, every
feature numeric, the spec's label as the label). The site sends
``spec_hash(SPEC)`` with its statistics and in the metadata of every update.
The coordinator's ``[fhir]`` section names the expected hash, or the spec file
it is computed from, and rejects a site with another hash, naming the site.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, model_validator

from prifed.deploy import wire
from prifed.deploy.errors import RequestRejected
from prifed.log import get_logger

if TYPE_CHECKING:
    from prifed.deploy.config import FederationConfig
    from prifed.deploy.sitedata import SiteRows
    from prifed.fhir.spec import FeatureSpec

logger = get_logger(__name__)

SPEC_HASH_KEY = "fhir_spec_hash"
"""Key of the spec hash in a site's statistics and in its update metadata."""


class FhirSection(BaseModel):
    """The ``[fhir]`` section: the feature spec every site must use.

    Give ``spec_hash`` (as ``prifed data spec-hash`` prints it) or ``spec``,
    the spec file, relative to the federation config.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec_hash: str | None = None
    spec: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> FhirSection:
        if (self.spec_hash is None) == (self.spec is None):
            raise ValueError("give exactly one of spec_hash and spec; got "
                             f"spec_hash {self.spec_hash!r} and spec {self.spec}")
        if self.spec_hash is not None:
            from prifed.fhir.spec import is_spec_hash

            if not is_spec_hash(self.spec_hash):
                raise ValueError("spec_hash must be 64 lowercase hex digits; got "
                                 f"{self.spec_hash!r}")
        return self


def expected_spec_hash(config: FederationConfig) -> str | None:
    """Return the spec hash the federation expects, or None without ``[fhir]``."""
    section = config.fhir
    if section is None:
        return None
    if section.spec_hash is not None:
        return section.spec_hash
    from prifed.fhir.spec import spec_hash

    assert section.spec is not None
    path = section.spec
    if not path.is_absolute():
        path = config.base_dir / path
    return spec_hash(path)


def check_spec_hash(expected: str | None, site: str, sent: str | None,
                    where: str) -> None:
    """Raise 409 naming the site when it sends another spec hash than expected."""
    if expected is None or sent == expected:
        return
    sent_text = "none" if sent is None else f"{sent[:16]}..."
    raise RequestRejected(
        409, "spec_mismatch",
        f"site {site!r} sent {where} built with FHIR spec hash {sent_text}; the "
        f"federation expects {expected[:16]}...; the site must use the "
        "federation's spec file unchanged (prifed data spec-hash)")


@dataclass
class FhirSource:
    """A site's rows read from a FHIR export with a feature spec."""

    folder: Path
    spec_file: Path
    spec: FeatureSpec = field(init=False)
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        from prifed.fhir.spec import load_spec, spec_hash

        self.spec = load_spec(self.spec_file)
        self.digest = spec_hash(self.spec)

    def load(self, site: str) -> SiteRows:
        """Build the site's feature table and keep its usable rows."""
        from prifed.data.tabular import TableSpec, label_sites, resolve_features, \
            site_rows
        from prifed.deploy.sitedata import SITE_COLUMN, SiteRows
        from prifed.fhir import load_site_table

        table, report = load_site_table(self.folder, self.spec, site=site)
        table = table.drop(columns=["site"])
        label = self.spec.columns[-1]
        features = [column for column in table.columns if column != label]
        logger.info("data: site %s built %d rows with %d features from FHIR in %s",
                    site, len(table), len(features), self.folder)
        table = table.assign(**{SITE_COLUMN: site})
        spec = TableSpec(SITE_COLUMN, label, features, [])
        numeric, categorical = resolve_features(table, spec)
        table, usable = label_sites(table, spec, numeric + categorical)
        rows = site_rows(table, usable, spec, site)
        return SiteRows(site, rows, numeric, categorical)


def with_spec_hash(handler: Callable[[bytes, dict[str, Any]], bytes], digest: str
                   ) -> Callable[[bytes, dict[str, Any]], bytes]:
    """Return a statistics handler whose reply also carries the spec hash."""

    def statistics(request: bytes, task: dict[str, Any]) -> bytes:
        body = json.loads(handler(request, task))
        body[SPEC_HASH_KEY] = digest
        return wire.dumps(body)

    return statistics
