"""A site's local trainer: a continuing shuffled stream over its training rows."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from prifed.errors import ConfigError, DataError
from prifed.training.metrics import binary_metrics

OPTIMIZERS = ("sgd", "adam")
DEFAULT_LOCAL_STEPS = 100
DEFAULT_BATCH_SIZE = 4
DEFAULT_LR = 0.001


def has_batch_norm(model: nn.Module) -> bool:
    """Return True if the model has a batch-norm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class LocalTrainer:
    """Train a model on one site's rows for a number of mini-batch steps.

    The shuffled order of rows continues across rounds, as a site that keeps
    one data loader open would; each epoch draws a new permutation from the
    site's own seeded generator.
    """

    def __init__(self, features: np.ndarray, labels: np.ndarray, seed: int) -> None:
        self.features = torch.from_numpy(np.ascontiguousarray(features, np.float32))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, np.float32))
        self.rng = np.random.default_rng(seed)
        self._order = np.empty(0, dtype=np.int64)
        self._position = 0

    @property
    def num_rows(self) -> int:
        return int(self.labels.shape[0])

    def next_batch(self, batch_size: int, min_rows: int = 1) -> np.ndarray:
        """Return the indices of the next mini-batch in the shuffled stream.

        An epoch's last batch is skipped when it would have fewer than
        ``min_rows`` rows (a batch-norm layer needs two rows to train).
        """
        if self.num_rows < min_rows:
            raise DataError(f"the site has {self.num_rows} training rows; this model "
                            f"needs at least {min_rows} per batch")
        if self._order.size - self._position < min_rows:
            self._order = self.rng.permutation(self.num_rows)
            self._position = 0
        batch = self._order[self._position:self._position + batch_size]
        self._position += batch.size
        return batch

    def stream_state(self) -> tuple[np.ndarray, dict[str, Any]]:
        """Return the stream's row order, and its position and generator state."""
        return self._order.copy(), {"position": self._position,
                                    "rng": self.rng.bit_generator.state}

    def load_stream_state(self, order: np.ndarray, values: Mapping[str, Any]) -> None:
        """Restore a stream saved by :meth:`stream_state`."""
        order = np.asarray(order, dtype=np.int64)
        position = int(values["position"])
        if order.size and (order.min() < 0 or order.max() >= self.num_rows):
            raise ValueError(f"saved row order refers to rows outside 0..."
                             f"{self.num_rows - 1}; was it saved by another site?")
        if not 0 <= position <= order.size:
            raise ValueError(f"saved stream position must be in 0..{order.size}; "
                             f"got {position}")
        self.rng.bit_generator.state = dict(values["rng"])
        self._order = order
        self._position = position

    def train(self, model: nn.Module, config: Mapping[str, Any],
              optimizer: torch.optim.Optimizer | None = None,
              extra_loss: Any = None) -> tuple[int, dict[str, float]]:
        """Run local steps; return the distinct rows used and training metrics.

        ``extra_loss`` is an optional callable of the model added to the loss
        (for example a proximal term).
        """
        steps = int(config.get("local_steps", DEFAULT_LOCAL_STEPS))
        batch_size = int(config.get("batch_size", DEFAULT_BATCH_SIZE))
        if optimizer is None:
            optimizer = make_optimizer(model, config)
        loss_fn = nn.BCEWithLogitsLoss()
        model.train()
        min_rows = 2 if has_batch_norm(model) else 1
        if batch_size < min_rows:
            raise ConfigError(f"batch_size must be at least {min_rows} for a model "
                              f"with batch-norm layers; got {batch_size}")
        seen = np.zeros(self.num_rows, dtype=bool)
        total_loss = 0.0
        started = time.perf_counter()
        for _ in range(steps):
            batch = self.next_batch(batch_size, min_rows)
            seen[batch] = True
            index = torch.from_numpy(batch)
            optimizer.zero_grad()
            loss = loss_fn(model(self.features[index]), self.labels[index])
            if extra_loss is not None:
                loss = loss + extra_loss(model)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach())
        metrics = {"train_loss": total_loss / max(steps, 1),
                   "train_seconds": time.perf_counter() - started}
        return int(seen.sum()), metrics


def make_optimizer(model: nn.Module, config: Mapping[str, Any]
                   ) -> torch.optim.Optimizer:
    """Build the local optimiser named in ``config`` (sgd or adam)."""
    name = str(config.get("optimizer", "sgd"))
    lr = float(config.get("lr", DEFAULT_LR))
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


def predict_scores(model: nn.Module, features: np.ndarray) -> np.ndarray:
    """Return the predicted probability of the positive class per row."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(features, np.float32)))
    return torch.sigmoid(logits).numpy().astype(np.float64)


def evaluate_model(model: nn.Module, features: np.ndarray,
                   labels: np.ndarray) -> dict[str, float]:
    """Return accuracy, ROC AUC and log loss of a model on a test set."""
    started = time.perf_counter()
    scores = predict_scores(model, features)
    metrics = binary_metrics(labels, scores)
    clipped = np.clip(scores, 1e-7, 1 - 1e-7)
    metrics["loss"] = float(-np.mean(labels * np.log(clipped)
                                     + (1 - labels) * np.log(1 - clipped)))
    metrics["eval_seconds"] = time.perf_counter() - started
    return metrics
