"""DP-SGD through Opacus: clipping by hand, noise calibration, Poisson batches."""

import numpy as np
import pytest
import torch
from torch import nn

from prifed.privacy.dpsgd import DPSGDTrainer
from prifed.privacy.errors import UnsupportedLayerError
from prifed.privacy.validation import find_unsupported_layers, validate_for_dp
from prifed.training.models import MLP, BatchNormMLP, build_model, get_params


def rows(n, features=13, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.float32)
    return x, y


def trainer(x, y, seed=1):
    return DPSGDTrainer(x, y, torch.Generator().manual_seed(seed))


def test_noise_free_step_is_mean_of_clipped_gradients():
    x, y = rows(12)
    model = build_model("logreg", 13, 0)
    before = get_params(model)
    w = before["linear.weight"].astype(np.float64)[0]
    b = float(before["linear.bias"][0])

    # Every row is sampled at rate 1; logistic loss gradients by hand.
    residual = 1 / (1 + np.exp(-(x @ w + b))) - y
    per_row = np.hstack([residual[:, None] * x, residual[:, None]])
    norms = np.linalg.norm(per_row, axis=1)
    clip = 0.5
    clipped = per_row * np.minimum(1, clip / (norms + 1e-6))[:, None]
    expected_step = -0.1 * clipped.sum(axis=0) / 12

    trainer(x, y).train(model, steps=1, expected_batch_size=12, noise_multiplier=0.0,
                        clip_norm=clip, lr=0.1)
    after = get_params(model)
    assert (norms > clip).sum() >= 6
    np.testing.assert_allclose(after["linear.weight"][0] - before["linear.weight"][0],
                               expected_step[:13], atol=1e-6)
    np.testing.assert_allclose(after["linear.bias"] - before["linear.bias"],
                               expected_step[13:], atol=1e-6)


def test_empty_batches_add_calibrated_noise():
    x, y = rows(50)
    model = MLP(13)
    before = get_params(model)
    sigma, clip, batch, steps = 1.5, 2.0, 0.001, 25
    result = trainer(x, y).train(model, steps=steps, expected_batch_size=batch,
                                 noise_multiplier=sigma, clip_norm=clip, lr=1.0)
    after = get_params(model)
    assert result.empty_steps == steps
    change = np.concatenate([(after[n] - before[n]).ravel() for n in before])
    # Each empty step moves every value by lr * N(0, (sigma * clip)^2) / batch.
    expected = sigma * clip / batch * np.sqrt(steps)
    assert change.size == 961
    assert np.std(change) == pytest.approx(expected, rel=0.1)
    assert abs(np.mean(change)) < 4 * expected / np.sqrt(change.size)


def test_poisson_sampling_leaves_expected_share_empty():
    x, y = rows(50)
    steps, batch = 400, 0.5
    result = trainer(x, y).train(build_model("logreg", 13, 0), steps=steps,
                                 expected_batch_size=batch, noise_multiplier=1.0,
                                 clip_norm=1.0, lr=0.01)
    # A step is empty when none of the 50 rows is drawn at rate 0.01.
    share = (1 - batch / 50) ** 50
    assert result.event.sample_rate == pytest.approx(0.01)
    assert result.empty_steps / steps == pytest.approx(share, abs=0.1)


def test_training_with_dp_learns_the_signal():
    x, y = rows(300, seed=3)
    model = build_model("logreg", 13, 0)
    trainer(x, y).train(model, steps=300, expected_batch_size=30,
                        noise_multiplier=1.0, clip_norm=1.0, lr=0.5)
    with torch.no_grad():
        scores = model(torch.from_numpy(x)).numpy()
    assert ((scores > 0) == (y > 0.5)).mean() > 0.75


def test_batch_norm_is_rejected_naming_layer():
    with pytest.raises(UnsupportedLayerError) as caught:
        validate_for_dp(BatchNormMLP(13))
    message = str(caught.value)
    assert "layer 'layers.1' (BatchNorm1d)" in message
    assert "nn.GroupNorm" in message


def test_batch_norm_without_weights_is_rejected():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))
    problems = find_unsupported_layers(model)
    assert len(problems) == 1
    assert "layer '1'" in problems[0]


def test_lstm_gets_opacus_replacement():
    problems = find_unsupported_layers(nn.Sequential(nn.LSTM(4, 8)))
    assert problems == ["layer '0' (LSTM): We do not support nn.LSTM because its "
                        "implementation uses special modules; use "
                        "opacus.layers.DPLSTM instead"]


def test_every_bad_layer_is_listed():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4),
                          nn.BatchNorm1d(4))
    assert len(find_unsupported_layers(model)) == 2


def test_trainer_refuses_batch_norm_before_any_step():
    x, y = rows(20)
    model = BatchNormMLP(13)
    before = get_params(model)
    with pytest.raises(UnsupportedLayerError, match="layers.1"):
        trainer(x, y).train(model, steps=5, expected_batch_size=4,
                            noise_multiplier=1.0, clip_norm=1.0, lr=0.1)
    after = get_params(model)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_supported_models_pass_validation():
    assert find_unsupported_layers(build_model("logreg", 13, 0)) == []
    assert find_unsupported_layers(build_model("mlp", 13, 0)) == []
