"""A model card a clinician can read, written beside every run's model."""

from __future__ import annotations

import math
from typing import Any


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}"


def model_card(summary: dict[str, Any]) -> str:
    """Render the run summary as a Markdown model card."""
    config = summary["config"]
    methods = summary["methods"]
    federated = next(iter(methods))
    lines = [
        "# Model card",
        "",
        f"Model: {config['model']} trained with {federated} over "
        f"{config['rounds']} rounds across {len(summary['sites'])} sites "
        f"(PriFed {summary['prifed_version']}, seed {config['seed']}).",
        f"Data: {config['data']}.",
        "",
        "## Intended use",
        "",
        "A research model for a binary outcome. It has not been validated "
        "prospectively and must not be used for decisions about individual "
        "patients without clinical validation at the site that would use it.",
        "",
        "## Performance on each site's held-out test set",
        "",
        "| site | train rows | test rows (positive) | " + " | ".join(
            f"{m} accuracy / AUC" for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for site, counts in summary["sites"].items():
        cells = [f"{_fmt(methods[m]['per_site'][site]['accuracy'])} / "
                 f"{_fmt(methods[m]['per_site'][site]['auc'])}" for m in methods]
        lines.append(f"| {site} | {counts['train_rows']} | {counts['test_rows']} "
                     f"({counts['test_positive']}) | " + " | ".join(cells) + " |")
    means = [f"{_fmt(methods[m]['mean']['accuracy'])} / "
             f"{_fmt(methods[m]['mean']['auc'])}" for m in methods]
    lines.append("| **mean** | | | " + " | ".join(means) + " |")
    if "pooled" in methods:
        lines += ["", "`pooled` trains on all sites' rows in one place: an upper "
                  "reference, not a federated model. `local` is each site's own "
                  "model on its own test set."]
    lines += ["", "## Risks and limitations", ""]
    lines += [f"- {risk}" for risk in risks(summary)]
    privacy = summary.get("privacy")
    lines += ["", "## Privacy", ""]
    if privacy:
        lines += [f"- {key}: {value}" for key, value in privacy.items()]
    else:
        lines.append("- No differential privacy was applied: the model may "
                     "reveal whether a patient was in the training data.")
    return "\n".join(lines) + "\n"


def risks(summary: dict[str, Any]) -> list[str]:
    """List the risks a reader should weigh, found in the run's own figures."""
    found = []
    for site, counts in summary["sites"].items():
        test_rows, positive = counts["test_rows"], counts["test_positive"]
        if positive in (0, test_rows):
            found.append(f"{site}: the test set has one class only ({test_rows} "
                         "rows), so AUC is undefined and accuracy rewards "
                         "always predicting that class.")
        elif test_rows < 30:
            found.append(f"{site}: only {test_rows} test rows; its figures are "
                         "uncertain.")
    failed = [r for r in summary.get("rounds", []) if r["failures"] or r["rejected"]]
    if failed:
        found.append(f"{len(failed)} rounds had failed or rejected site updates; "
                     "see summary.json.")
    if not found:
        found.append("No site-specific risk detected from the run's figures.")
    return found
