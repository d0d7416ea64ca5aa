"""Extra terms of a site's local objective: FedProx's proximal term and SCAFFOLD.

Both enter through :meth:`LocalTrainer.train`'s ``extra_loss``. SCAFFOLD's
gradient correction ``c - c_i`` is written as the linear term
``sum(<w, c - c_i>)``, whose gradient is exactly the correction, so any
optimiser applies it without a hook in the training loop.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from prifed.core.aggregate import cast_like
from prifed.core.params import ParameterSet

LossTerm = Callable[[nn.Module], torch.Tensor]
"""A differentiable term of the model added to each mini-batch loss."""


def proximal_term(model: nn.Module, anchor: Mapping[str, np.ndarray], mu: float,
                  skip: Collection[str] = ()) -> LossTerm:
    """Return ``mu / 2 * ||w - anchor||^2`` over the model's trainable tensors."""
    targets = {name: torch.from_numpy(np.array(anchor[name], np.float32))
               for name, param in model.named_parameters()
               if param.requires_grad and name not in skip}

    def term(current: nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for name, param in current.named_parameters():
            if name in targets:
                total = total + (param - targets[name].to(param.dtype)).pow(2).sum()
        return 0.5 * mu * total

    return term


def control_correction(server_control: Mapping[str, np.ndarray],
                       site_control: Mapping[str, np.ndarray]) -> LossTerm:
    """Return SCAFFOLD's linear term, whose gradient is ``c - c_i`` per tensor."""
    corrections = {name: torch.from_numpy(
        (np.asarray(c, np.float64) - site_control[name]).astype(np.float32))
        for name, c in server_control.items()}

    def term(current: nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for name, param in current.named_parameters():
            if name in corrections:
                total = total + (param * corrections[name].to(param.dtype)).sum()
        return total

    return term


def sum_terms(terms: Sequence[LossTerm]) -> LossTerm | None:
    """Return one term adding ``terms``, or None when there are none."""
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]

    def total(model: nn.Module) -> torch.Tensor:
        return sum((term(model) for term in terms), torch.zeros(()))

    return total


def updated_site_control(site_control: Mapping[str, np.ndarray],
                         server_control: Mapping[str, np.ndarray],
                         global_params: Mapping[str, np.ndarray],
                         local_params: Mapping[str, np.ndarray],
                         steps: int, lr: float,
                         frozen: Collection[str] = ()
                         ) -> tuple[dict[str, np.ndarray], ParameterSet]:
    """Apply SCAFFOLD option II; return the new ``c_i`` and ``c_i+ - c_i``.

    ``c_i+ = c_i - c + (x - y_i) / (steps * lr)`` in float64. Tensors in
    ``frozen`` (layers the site keeps local) keep their ``c_i`` and send a
    zero delta. Deltas are cast to the global model's dtypes.
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"steps must be at least 1 and lr positive; got steps "
                         f"{steps}, lr {lr}")
    new_control: dict[str, np.ndarray] = {}
    deltas: ParameterSet = {}
    for name, c in server_control.items():
        old = np.asarray(site_control[name], np.float64)
        if name in frozen:
            new = old.copy()
        else:
            drift = (np.asarray(global_params[name], np.float64)
                     - np.asarray(local_params[name], np.float64))
            new = old - np.asarray(c, np.float64) + drift / (steps * lr)
        new_control[name] = new
        deltas[name] = cast_like(new - old, global_params[name].dtype)
    return new_control, deltas
