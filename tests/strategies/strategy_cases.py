"""Shared pieces of the strategy tests: a batch-norm parameter set and tiny sites."""

from __future__ import annotations

import numpy as np

from prifed.core.messages import TrainInstruction, TrainReply
from prifed.strategies.base import CONTROL_DELTA_PREFIX, CONTROL_PREFIX
from prifed.training.client import SiteClient
from prifed.training.models import build_model

# A model with a batch-norm layer: two trainable tensors and three buffers,
# one of them an integer counter.
GLOBAL = {
    "w": np.array([[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]], np.float32),
    "b": np.array([0.1, -0.2, 0.3], np.float32),
    "bn.running_mean": np.array([0.0, 0.5, -0.5], np.float32),
    "bn.running_var": np.array([1.0, 2.0, 0.5], np.float32),
    "bn.num_batches_tracked": np.array(4, np.int64),
}
TRAINABLE = ["w", "b"]
BUFFERS = ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]

# Strategies whose server step is plain averaging with default options, and
# those that step with adaptive moments. Every registered strategy must be in
# one of the two, so a new strategy cannot skip the contract by accident.
AVERAGING = {"fedavg", "fedprox", "scaffold", "fedbuff"}
SERVER_OPTIMISERS = {"fedadam", "fedyogi", "fedadagrad"}


def shifted(params, offset, counter):
    """Return a copy of ``params`` moved by ``offset`` with counter ``counter``."""
    out = {}
    for name, value in params.items():
        if np.issubdtype(value.dtype, np.floating):
            out[name] = (value + offset).astype(value.dtype)
        else:
            out[name] = np.array(counter, value.dtype)
    return out


def reply_for(instruction: TrainInstruction, params, num_samples, delta_scale=0.0):
    """Build a site's reply, with control deltas when the instruction carries c."""
    extra = {CONTROL_DELTA_PREFIX + key[len(CONTROL_PREFIX):]:
             np.full(value.shape, delta_scale, value.dtype)
             for key, value in instruction.extra.items()
             if key.startswith(CONTROL_PREFIX)}
    return TrainReply(instruction.site, instruction.server_round,
                      {k: np.array(v) for k, v in params.items()}, num_samples,
                      extra=extra)


def tiny_sites(model="bn-mlp", num_sites=3, rows=24, features=5, seed=0):
    """Build sites with small, different synthetic tables (not patient data)."""
    rng = np.random.default_rng(seed)
    sites = []
    for index in range(num_sites):
        x = rng.normal(loc=index * 0.5, size=(rows, features)).astype(np.float32)
        y = (x[:, 0] + rng.normal(scale=0.5, size=rows) > index * 0.5)
        test_x = rng.normal(loc=index * 0.5, size=(8, features)).astype(np.float32)
        test_y = (test_x[:, 0] > index * 0.5)

        def factory(model=model, features=features):
            return build_model(model, features, seed)

        sites.append(SiteClient(f"site-{index}", factory, x, y.astype(np.float32),
                                test_x, test_y.astype(np.float32), seed + index))
    return sites
