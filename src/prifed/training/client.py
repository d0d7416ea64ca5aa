"""The site side of a round: train the global model locally, evaluate it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
from torch import nn

from prifed.core.messages import EvaluateReply, TrainInstruction, TrainReply
from prifed.training.local import LocalTrainer, evaluate_model
from prifed.training.models import get_params, set_params


class SiteClient:
    """One site's data and model, answering training and evaluation requests.

    The model is rebuilt from the global parameters for every request, so no
    state leaks between rounds except the trainer's shuffled stream.
    """

    def __init__(self, name: str, model_factory: Callable[[], nn.Module],
                 train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, seed: int) -> None:
        self.name = name
        self.model_factory = model_factory
        self.trainer = LocalTrainer(train_x, train_y, seed)
        self.test_x = test_x
        self.test_y = test_y

    @property
    def num_train(self) -> int:
        return self.trainer.num_rows

    def fit(self, params: Mapping[str, np.ndarray],
            instruction: TrainInstruction) -> TrainReply:
        """Train the global model on local rows and return the local model."""
        started = time.perf_counter()
        model = self.model_factory()
        set_params(model, params)
        num_samples, metrics = self.trainer.train(model, instruction.config)
        local = get_params(model)
        metrics["train_seconds"] = time.perf_counter() - started
        return TrainReply(self.name, instruction.server_round, local, num_samples,
                          metrics)

    def evaluate(self, params: Mapping[str, np.ndarray]) -> EvaluateReply:
        """Evaluate the global model on this site's test rows."""
        started = time.perf_counter()
        model = self.model_factory()
        set_params(model, params)
        metrics = evaluate_model(model, self.test_x, self.test_y)
        metrics["eval_seconds"] = time.perf_counter() - started
        return EvaluateReply(self.name, int(self.test_y.shape[0]), metrics)
