"""The site side of a round: train the global model locally, evaluate it.

Besides plain local training, a site applies what its instruction asks for:
FedProx's proximal term (``config["proximal_mu"]``) and SCAFFOLD's corrected
steps (``extra["control/<tensor>"]``). State that outlives a round stays at
the site and can be saved to a file and restored after a restart: the
SCAFFOLD control variate ``c_i``, the layers it keeps local, and the
position of its shuffled stream of rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from prifed.core.messages import EvaluateReply, TrainInstruction, TrainReply
from prifed.core.params import ParameterSet
from prifed.errors import NotSupportedError
from prifed.log import get_logger
from prifed.strategies.base import (CONTROL_DELTA_PREFIX, CONTROL_PREFIX,
                                    PROXIMAL_MU_KEY, state_from_bytes,
                                    state_to_bytes)
from prifed.training.local import (DEFAULT_BATCH_SIZE, DEFAULT_LOCAL_STEPS,
                                   DEFAULT_LR, LocalTrainer, evaluate_model)
from prifed.training.models import get_params, set_params
from prifed.training.objectives import (LossTerm, control_correction, proximal_term,
                                        sum_terms, updated_site_control)
from prifed.training.personal import Personalization, merge_local

logger = get_logger(__name__)

# Fine-tuning draws its batches from a generator of its own, so evaluating a
# personalised model never moves the training stream.
_FINETUNE_SEED_OFFSET = 7919


class SiteClient:
    """One site's data and model, answering training and evaluation requests.

    The model is rebuilt from the global parameters for every request. What
    persists between rounds is listed in :meth:`state_dict`.
    """

    def __init__(self, name: str, model_factory: Callable[[], nn.Module],
                 train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, seed: int,
                 personalization: Personalization | None = None) -> None:
        self.name = name
        self.model_factory = model_factory
        self.trainer = LocalTrainer(train_x, train_y, seed)
        self.train_x = train_x
        self.train_y = train_y
        self.test_x = test_x
        self.test_y = test_y
        self.seed = seed
        self.personalization = personalization or Personalization()
        self.control: dict[str, np.ndarray] = {}
        self.local_tensors: ParameterSet = {}
        self.last_config: dict[str, Any] = {}

    @property
    def num_train(self) -> int:
        return self.trainer.num_rows

    def fit(self, params: Mapping[str, np.ndarray],
            instruction: TrainInstruction) -> TrainReply:
        """Train the global model on local rows and return the local model."""
        started = time.perf_counter()
        config = instruction.config
        local_names = self.personalization.local_names(params)
        model = self.model_factory()
        set_params(model, merge_local(params, self.local_tensors))

        terms: list[LossTerm] = []
        mu = float(config.get(PROXIMAL_MU_KEY, 0.0))
        if mu > 0:
            terms.append(proximal_term(model, params, mu, skip=local_names))
        server_control = self._server_control(instruction, params)
        if server_control is not None:
            shared = {n: c for n, c in server_control.items() if n not in local_names}
            terms.append(control_correction(shared, self.control))
        num_samples, metrics = self.trainer.train(model, config,
                                                  extra_loss=sum_terms(terms))
        trained = get_params(model)

        extra: ParameterSet = {}
        if server_control is not None:
            steps = int(config.get("local_steps", DEFAULT_LOCAL_STEPS))
            lr = float(config.get("lr", DEFAULT_LR))
            self.control, deltas = updated_site_control(
                self.control, server_control, params, trained, steps, lr,
                frozen=local_names)
            extra = {CONTROL_DELTA_PREFIX + n: d for n, d in deltas.items()}
        if local_names:
            self.local_tensors = {n: trained[n].copy() for n in local_names}
            # The coordinator gets its own copy back: local values never leave.
            for name in local_names:
                trained[name] = np.array(params[name], copy=True)
        self.last_config = dict(config)
        metrics["train_seconds"] = time.perf_counter() - started
        logger.debug("fit round %d: site %s trained on %d samples in %.3f s",
                     instruction.server_round, self.name, num_samples,
                     metrics["train_seconds"])
        return TrainReply(self.name, instruction.server_round, trained, num_samples,
                          metrics, extra)

    def _server_control(self, instruction: TrainInstruction,
                        params: Mapping[str, np.ndarray]
                        ) -> dict[str, np.ndarray] | None:
        """Return the server control variate of a SCAFFOLD instruction, else None."""
        control = {key[len(CONTROL_PREFIX):]: value
                   for key, value in instruction.extra.items()
                   if key.startswith(CONTROL_PREFIX)}
        if not control:
            return None
        optimizer = instruction.config.get("optimizer", "sgd")
        if optimizer != "sgd":
            raise NotSupportedError(f"site {self.name!r}: scaffold needs plain SGD; "
                                    f"got optimizer {optimizer!r}")
        for name, value in control.items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"site {self.name!r}: control variate {name!r} "
                                 "does not match a tensor of the global model")
        if (set(self.control) != set(control) or any(
                self.control[n].shape != c.shape for n, c in control.items())):
            if self.control:
                logger.warning("fit: site %s resets its control variate, whose "
                               "tensors differ from the coordinator's", self.name)
            self.control = {n: np.zeros(c.shape) for n, c in control.items()}
        return control

    def evaluate(self, params: Mapping[str, np.ndarray]) -> EvaluateReply:
        """Evaluate the global model, and the personalised one when configured."""
        started = time.perf_counter()
        model = self.model_factory()
        set_params(model, params)
        metrics = evaluate_model(model, self.test_x, self.test_y)
        if self.personalization.enabled:
            personal = evaluate_model(self.personal_model(params), self.test_x,
                                      self.test_y)
            metrics.update({f"personal_{k}": v for k, v in personal.items()
                            if k != "eval_seconds"})
        metrics["eval_seconds"] = time.perf_counter() - started
        return EvaluateReply(self.name, int(self.test_y.shape[0]), metrics)

    def personal_model(self, params: Mapping[str, np.ndarray]) -> nn.Module:
        """Return the global model with local layers, fine-tuned on local rows."""
        model = self.model_factory()
        set_params(model, merge_local(params, self.local_tensors))
        options = self.personalization
        if options.finetune_steps > 0:
            trainer = LocalTrainer(self.train_x, self.train_y,
                                   self.seed + _FINETUNE_SEED_OFFSET)
            trainer.train(model, {
                "local_steps": options.finetune_steps,
                "batch_size": options.finetune_batch_size or int(
                    self.last_config.get("batch_size", DEFAULT_BATCH_SIZE)),
                "lr": options.finetune_lr or float(
                    self.last_config.get("lr", DEFAULT_LR)),
                "optimizer": options.finetune_optimizer})
        return model

    def state_dict(self) -> dict[str, Any]:
        """Return what persists across rounds: control variate, local layers, stream."""
        order, stream = self.trainer.stream_state()
        return {"site": self.name, "control": {n: c.copy()
                                               for n, c in self.control.items()},
                "local_tensors": {n: t.copy() for n, t in self.local_tensors.items()},
                "stream": {"order": order, **stream},
                "last_config": dict(self.last_config)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, checking it is this site's."""
        if state["site"] != self.name:
            raise ValueError(f"site state belongs to site {state['site']!r}, not "
                             f"{self.name!r}")
        stream = dict(state["stream"])
        self.trainer.load_stream_state(stream.pop("order"), stream)
        self.control = {n: np.array(c, np.float64)
                        for n, c in state["control"].items()}
        self.local_tensors = {n: np.array(t) for n, t in state["local_tensors"].items()}
        self.last_config = dict(state["last_config"])

    def save_state(self, path: Path) -> None:
        """Write the site's state to a safetensors file (never pickle)."""
        path.write_bytes(state_to_bytes(self.state_dict()))
        logger.info("state: site %s saved %d control and %d local tensors to %s",
                    self.name, len(self.control), len(self.local_tensors), path)

    def load_state(self, path: Path) -> None:
        """Restore the state that :meth:`save_state` wrote."""
        self.load_state_dict(state_from_bytes(path.read_bytes()))
