"""Exceptions of the privacy package, under PriFed's exception tree.

    PriFedError
    ├── ConfigError
    │   └── PolicyError         a site's privacy policy file is missing or invalid
    ├── NotSupportedError
    │   └── UnsupportedLayerError  a model layer cannot be trained with DP-SGD
    └── BudgetExhausted         the next round would exceed a site's privacy limit
"""

from __future__ import annotations

from prifed.errors import ConfigError, NotSupportedError, PriFedError


class PolicyError(ConfigError):
    """A site's privacy policy file is missing or invalid."""


class UnsupportedLayerError(NotSupportedError):
    """A model contains layers that DP-SGD cannot train; names each layer."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("model cannot be trained with DP-SGD: "
                         + "; ".join(self.problems))


class BudgetExhausted(PriFedError):
    """The next round would take a site's privacy spend above its own limit."""

    def __init__(self, site: str, spent: float, projected: float, limit: float,
                 delta: float, rounds: int, policy: str) -> None:
        self.site = site
        self.spent = spent
        self.projected = projected
        self.limit = limit
        recorded = f"{rounds} recorded round" + ("" if rounds == 1 else "s")
        super().__init__(
            f"privacy budget of site {site!r} would be exceeded: it has spent "
            f"epsilon {spent:.4g} at delta {delta:g} over {recorded}, and this "
            f"round would raise it to {projected:.4g}, above the limit {limit:g} "
            f"set by the site in its {policy}; the site does not train")
