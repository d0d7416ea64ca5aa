"""Site-side support: FedProx's term, personalisation and saved site state.

FedProx by hand, on the toy site of the SCAFFOLD tests (x = [1, -1], labels
[1, 0], full batches, SGD lr 0.5, two steps from w = b = 0, mu = 1):

    step 1: p = (0.5, 0.5), grad w = -0.5, proximal grad 0: w = 0.25, b = 0
    step 2: p = (sigmoid(0.25), sigmoid(-0.25)) = (0.5621765, 0.4378235)
            grad w = -0.4378235, proximal grad mu * (0.25 - 0) = 0.25
            w = 0.25 - 0.5 * (-0.4378235 + 0.25) = 0.3439117; b stays 0
"""

import numpy as np
import pytest
import torch

from prifed.core.messages import TrainInstruction
from prifed.errors import ConfigError
from prifed.strategies.base import PROXIMAL_MU_KEY
from prifed.training.models import build_model, get_params
from prifed.training.objectives import proximal_term
from prifed.training.personal import Personalization

from strategy_cases import tiny_sites
from test_scaffold import CONFIG, ZERO, toy_site


def test_proximal_step_matches_hand_computation():
    instruction = TrainInstruction("toy", 1, dict(CONFIG, **{PROXIMAL_MU_KEY: 1.0}))
    reply = toy_site().fit(ZERO, instruction)
    np.testing.assert_allclose(reply.params["linear.weight"], [[0.3439117]],
                               rtol=1e-6)
    np.testing.assert_allclose(reply.params["linear.bias"], [0.0], atol=1e-7)


def test_proximal_term_value():
    model = build_model("logreg", 3, 0)
    anchor = {k: v + 0.5 for k, v in get_params(model).items()}
    term = proximal_term(model, anchor, mu=0.2)
    # mu / 2 * sum of squares: 0.1 * (3 weights + 1 bias, each off by 0.5^2)
    assert float(term(model).detach()) == pytest.approx(0.1, rel=1e-6)
    with torch.no_grad():
        model.linear.bias += 0.5
    assert float(term(model).detach()) == pytest.approx(0.1 * 3 * 0.25, rel=1e-6)


def test_proximal_term_keeps_model_near_global():
    far, near = [], []
    for mu, out in ((0.0, far), (10.0, near)):
        site = tiny_sites(model="logreg", num_sites=1)[0]
        params = get_params(site.model_factory())
        config = {"local_steps": 30, "batch_size": 4, "lr": 0.05, PROXIMAL_MU_KEY: mu}
        reply = site.fit(params, TrainInstruction(site.name, 1, config))
        out.append(np.linalg.norm(reply.params["linear.weight"]
                                  - params["linear.weight"]))
    assert near[0] < 0.5 * far[0]


def personal_site(**options):
    site = tiny_sites(model="bn-mlp", num_sites=1)[0]
    site.personalization = Personalization(**options)
    return site


def test_local_layers_never_leave_the_site():
    site = personal_site(local_layers=("layers.1",))
    params = get_params(site.model_factory())
    config = {"local_steps": 6, "batch_size": 4, "lr": 0.1}
    reply = site.fit(params, TrainInstruction(site.name, 1, config))
    for name in ("layers.1.weight", "layers.1.running_mean",
                 "layers.1.num_batches_tracked"):
        np.testing.assert_array_equal(reply.params[name], params[name])
        assert not np.array_equal(site.local_tensors[name], params[name]), name
    assert not np.allclose(reply.params["layers.0.weight"], params["layers.0.weight"])
    # The next round starts from the site's own layer, not the global one.
    before = {k: v.copy() for k, v in site.local_tensors.items()}
    site.fit(params, TrainInstruction(site.name, 2, dict(config, local_steps=1)))
    assert int(site.local_tensors["layers.1.num_batches_tracked"]) == int(
        before["layers.1.num_batches_tracked"]) + 1


def test_personalised_metrics_beside_global():
    site = personal_site(local_layers=("layers.1",), finetune_steps=10,
                         finetune_lr=0.05)
    params = get_params(site.model_factory())
    site.fit(params, TrainInstruction(site.name, 1, {"local_steps": 6, "lr": 0.1}))
    first = site.evaluate(params).metrics
    again = site.evaluate(params).metrics
    for key in ("accuracy", "auc", "loss"):
        assert key in first
        assert f"personal_{key}" in first
    assert first["personal_loss"] != first["loss"]
    # Fine-tuning has its own generator: evaluating twice gives the same result.
    assert again["personal_loss"] == first["personal_loss"]


def test_unknown_local_layer_is_rejected():
    site = personal_site(local_layers=("head",))
    params = get_params(site.model_factory())
    with pytest.raises(ConfigError, match="'head' matches no tensor"):
        site.fit(params, TrainInstruction(site.name, 1, {"local_steps": 1}))


def test_site_state_restores_stream_and_local_layers(tmp_path):
    site = personal_site(local_layers=("layers.1",))
    params = get_params(site.model_factory())
    config = {"local_steps": 5, "batch_size": 4, "lr": 0.1}
    site.fit(params, TrainInstruction(site.name, 1, config))
    site.save_state(tmp_path / "site.safetensors")
    restarted = personal_site(local_layers=("layers.1",))
    restarted.load_state(tmp_path / "site.safetensors")
    expected = site.fit(params, TrainInstruction(site.name, 2, config))
    got = restarted.fit(params, TrainInstruction(site.name, 2, config))
    for name in expected.params:
        np.testing.assert_array_equal(got.params[name], expected.params[name])
    for name in site.local_tensors:
        np.testing.assert_array_equal(restarted.local_tensors[name],
                                      site.local_tensors[name])
    assert restarted.local_tensors["layers.1.num_batches_tracked"].shape == ()


def test_site_state_of_another_site_is_rejected(tmp_path):
    site = personal_site()
    site.save_state(tmp_path / "site.safetensors")
    other = tiny_sites(num_sites=2)[1]
    with pytest.raises(ValueError, match="belongs to site 'site-0'"):
        other.load_state(tmp_path / "site.safetensors")
