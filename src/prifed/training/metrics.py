"""Evaluation metrics for binary classifiers."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score


def binary_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Return accuracy at 0.5 and ROC AUC; AUC is NaN when one class is absent."""
    labels = np.asarray(labels).astype(int)
    predictions = (scores >= 0.5).astype(int)
    accuracy = float((predictions == labels).mean()) if labels.size else math.nan
    if np.unique(labels).size < 2:
        auc = math.nan
    else:
        auc = float(roc_auc_score(labels, scores))
    return {"accuracy": accuracy, "auc": auc}


def nanmean(values: list[float]) -> float:
    """Average the defined values; NaN when none is defined."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan
