"""Shared keys and helpers for the homomorphic aggregation tests."""

from __future__ import annotations

import pytest

from prifed.he.keys import FederationKey, coordinator_key, create_federation_key
from prifed.he.params import select_params


@pytest.fixture(scope="session")
def site_key() -> FederationKey:
    """A key for up to 4 sites with weights up to 1000 (N = 4096)."""
    return create_federation_key(select_params(4, 1.0, 1e-6, 1000.0), run="tests")


@pytest.fixture(scope="session")
def coord_key(site_key: FederationKey) -> FederationKey:
    return coordinator_key(site_key)

