"""The local trainer's shuffled stream, and its batches for batch-norm models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prifed.errors import ConfigError, DataError
from prifed.training.local import LocalTrainer
from prifed.training.models import build_model


def trainer(rows: int) -> LocalTrainer:
    features = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    labels = (np.arange(rows) % 2).astype(np.float32)
    return LocalTrainer(features, labels, seed=7)


def test_stream_keeps_one_row_tail():
    stream = trainer(5)
    sizes = [stream.next_batch(4).size for _ in range(4)]
    assert sizes == [4, 1, 4, 1]


def test_stream_skips_tail_below_minimum():
    stream = trainer(5)
    batches = [stream.next_batch(4, min_rows=2) for _ in range(3)]
    assert [b.size for b in batches] == [4, 4, 4]
    # Every epoch is a permutation of the rows, cut after its first batch.
    for batch in batches:
        assert len(set(batch.tolist())) == 4


def test_batch_norm_model_trains_on_one_row_tail():
    stream = trainer(5)
    model = build_model("bn-mlp", 3, seed=1)
    stream.train(model, {"local_steps": 6, "batch_size": 4, "lr": 0.01})
    counter = model.state_dict()["layers.1.num_batches_tracked"]
    assert int(counter) == 6
    assert counter.dtype == torch.int64


def test_batch_norm_model_rejects_single_row_site():
    stream = trainer(1)
    model = build_model("bn-mlp", 3, seed=1)
    with pytest.raises(DataError) as caught:
        stream.train(model, {"local_steps": 1, "batch_size": 4})
    assert "the site has 1 training rows; this model needs at least 2" in \
        str(caught.value)


def test_batch_norm_model_rejects_batch_of_one():
    stream = trainer(5)
    model = build_model("bn-mlp", 3, seed=1)
    with pytest.raises(ConfigError) as caught:
        stream.train(model, {"local_steps": 1, "batch_size": 1})
    assert "batch_size must be at least 2 for a model with batch-norm layers" in \
        str(caught.value)
