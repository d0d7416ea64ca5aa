"""The run folder: summary JSON, per-round CSV, final model and a plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

from prifed import __version__  # noqa: E402
from prifed.core.params import params_to_bytes  # noqa: E402
from prifed.modelcard import model_card  # noqa: E402
from prifed.privacy.federation import describe_spend, privacy_summary  # noqa: E402
from prifed.simulation import SimulationResult, mean_metrics  # noqa: E402

METRICS = ("accuracy", "auc")


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def summary(result: SimulationResult) -> dict[str, Any]:
    """Build the machine-readable summary of a run."""
    methods = {}
    for method in result.methods:
        final = method.final
        methods[method.method] = {
            "note": method.note,
            "seconds": round(method.seconds, 3),
            "simulated_seconds": (round(method.times[-1], 3) if method.times
                                  else None),
            "per_site": {site: {k: _clean(m[k]) for k in METRICS}
                         for site, m in final.items()},
            "mean": {k: _clean(v) for k, v in mean_metrics(final).items()},
        }
    federated = result.methods[0].seconds
    return {
        "prifed_version": __version__,
        "config": result.config.to_dict(),
        "sites": {s.name: {"train_rows": int(s.train_y.size),
                           "test_rows": int(s.test_y.size),
                           "train_positive": int(s.train_y.sum()),
                           "test_positive": int(s.test_y.sum())}
                  for s in result.sites},
        "features": result.sites[0].preprocessor.feature_names,
        "partition": result.config.partition.describe(),
        "methods": methods,
        "privacy": privacy_summary(result.history, result.config.privacy),
        "rounds": [{"round": r.server_round, "accepted": r.accepted,
                    "failures": r.failures, "rejected": r.rejected,
                    "skipped": r.skipped} for r in result.history],
        "timing": {"federated_seconds": round(federated, 3),
                   "local_compute_seconds": round(result.compute_seconds, 3),
                   "overhead_share": round(1 - result.compute_seconds / federated, 4)
                   if federated > 0 else None},
        "metric_notes": "mean is the plain mean over sites; a site whose test set "
                        "has one class has no AUC and is left out of the AUC mean",
    }


def write_run_folder(result: SimulationResult, folder: Path) -> dict[str, Path]:
    """Write the summary, per-round CSV, model, plot and model card."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in
             ("summary.json", "rounds.csv", "model.safetensors", "metrics.png",
              "MODEL_CARD.md")}
    data = summary(result)
    paths["summary.json"].write_text(json.dumps(data, indent=2, allow_nan=False))
    _write_rounds(result, paths["rounds.csv"])
    paths["model.safetensors"].write_bytes(
        params_to_bytes(result.model, model_metadata(result)))
    _plot(result, paths["metrics.png"])
    paths["MODEL_CARD.md"].write_text(model_card(data))
    return paths


def model_metadata(result: SimulationResult) -> dict[str, str]:
    """Describe the model and its preprocessing in one metadata entry.

    One JSON entry keeps the file byte-identical run after run: safetensors
    writes several metadata keys in no fixed order. With ``standardize=site``
    every site's preprocessor is kept, because each applies its own.
    """
    config = result.config
    preprocessors = {s.name: s.preprocessor.to_dict() for s in result.sites}
    description: dict[str, Any] = {
        "format": "prifed-model-1", "model": config.model,
        "strategy": config.strategy, "standardize": config.standardize,
        "feature_names": result.sites[0].preprocessor.feature_names,
    }
    if config.standardize == "site":
        description["preprocessors"] = preprocessors
    else:
        description["preprocessor"] = preprocessors[result.sites[0].name]
    return {"prifed": json.dumps(description, sort_keys=True)}


def _write_rounds(result: SimulationResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "round", "site", "accuracy", "auc", "loss"])
        for method in result.methods:
            for server_round, per_site in enumerate(method.curve, start=1):
                rows = list(per_site.items()) + [("mean", mean_metrics(per_site))]
                for site, m in rows:
                    writer.writerow([method.method, server_round, site,
                                     _fmt(m.get("accuracy")), _fmt(m.get("auc")),
                                     _fmt(m.get("loss"))])


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value:.6f}"


def _plot(result: SimulationResult, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, METRICS, strict=True):
        for method in result.methods:
            values = [mean_metrics(per_site)[metric] for per_site in method.curve]
            axis.plot(range(1, len(values) + 1), values, marker="o", markersize=3,
                      label=method.method)
        axis.set_xlabel("round")
        axis.set_ylabel(f"mean test {metric}")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.suptitle("PriFed: mean over sites' test sets per round")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def results_table(result: SimulationResult) -> Table:
    """Build the table of accuracy and AUC per site and their mean, per method."""
    title = "Test accuracy / ROC AUC per site"
    if result.config.partition.synthetic:
        title += f"\n{result.config.partition.describe()}"
    table = Table(title=title)
    longest = max(len(m.method) for m in result.methods) + len(" (upper ref.)")
    table.add_column("method", min_width=min(longest, 40))
    site_names = [s.name for s in result.sites]
    for name in site_names + ["mean"]:
        table.add_column(name, justify="right")
    # Simulated time matters once sites differ in speed or availability, or a
    # strategy is asynchronous; otherwise the table stays as it was.
    show_time = bool(result.config.site_profiles) or any(
        m.note.startswith("asynchronous") for m in result.methods)
    if show_time:
        table.add_column("simulated s", justify="right")
    for method in result.methods:
        final = method.final
        cells = [_pair(final[s]) for s in site_names]
        cells.append(_pair(mean_metrics(final)))
        if show_time:
            cells.append(f"{method.times[-1]:.1f}" if method.times else "")
        label = method.method + (" (upper ref.)" if method.method == "pooled" else "")
        table.add_row(label, *cells)
    if result.config.privacy.enabled:
        table.caption = describe_spend(privacy_summary(result.history,
                                                       result.config.privacy))
    return table


def _pair(metrics: dict[str, float]) -> str:
    auc = metrics["auc"]
    auc_text = "n/a" if math.isnan(auc) else f"{auc:.3f}"
    return f"{metrics['accuracy']:.3f} / {auc_text}"
