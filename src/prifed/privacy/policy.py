"""A site's privacy policy: the limit its data may spend, in a file the site owns.

The policy is a JSON file in the site's privacy folder, beside its data and
its ledger. The site writes it; nothing the coordinator sends changes it.

    {
      "epsilon_limit": 3.0,
      "delta": 1e-05,
      "accountant": "rdp",
      "allowed_modes": ["record", "site"],
      "min_noise_multiplier": 0.0
    }

``epsilon_limit`` is the most epsilon, at ``delta``, that all rounds ever
recorded in the ledger may add up to; null means no limit (spend is still
recorded). ``accountant`` is the one the ledger uses. ``allowed_modes`` lists
the DP modes the site accepts; a request for another mode, or for training
without DP, is refused. ``min_noise_multiplier`` is the least noise the site
accepts in a request.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from prifed.privacy.errors import PolicyError

POLICY_FILE = "privacy-policy.json"
LEDGER_FILE = "privacy-ledger.sqlite"


class SitePolicy(BaseModel):
    """The privacy limit and accepted settings of one site."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon_limit: float | None = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"
    allowed_modes: tuple[Literal["record", "site"], ...] = ("record", "site")
    min_noise_multiplier: float = Field(default=0.0, ge=0)

    @field_validator("epsilon_limit")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and math.isinf(value):
            raise ValueError("use null for no limit, not infinity")
        return value

    @property
    def limit(self) -> float:
        """Return the epsilon limit, infinite when the policy sets none."""
        return math.inf if self.epsilon_limit is None else self.epsilon_limit


def policy_path(folder: Path) -> Path:
    """Return the path of the policy file in a site's privacy folder."""
    return folder / POLICY_FILE


def load_policy(folder: Path) -> SitePolicy:
    """Read and validate the policy file of a site's privacy folder."""
    path = policy_path(folder)
    if not path.is_file():
        raise PolicyError(f"privacy policy file not found: {path}; the site must "
                          "create it (prifed privacy init-policy)")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        return SitePolicy.model_validate(values)
    except json.JSONDecodeError as error:
        raise PolicyError(f"privacy policy {path} is not valid JSON: "
                          f"{error.msg} at line {error.lineno}") from None
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(file)"
        raise PolicyError(f"privacy policy {path}: field {field!r} is invalid: "
                          f"{first['msg']}") from None


def write_policy(folder: Path, policy: SitePolicy, overwrite: bool = False) -> Path:
    """Write a policy file into a site's privacy folder; keep an existing one."""
    path = policy_path(folder)
    if path.exists() and not overwrite:
        raise PolicyError(f"privacy policy file already exists: {path}")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(policy.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path
