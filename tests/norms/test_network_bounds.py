"""Network bounds against sampled Jacobians: no sampled local slope may exceed a sound bound."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.data import load_data
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.layers import Activation, Dense, Reshape, Residual, Shift, run_layers
from lipverify.network.load import build_network
from lipverify.network.modules import GroupSort, Normalize, ResidualBlock
from lipverify.network.network import Network
from lipverify.norms.network import (
    NetworkBounds,
    layer_bound,
    layer_norm_bound,
    network_bounds,
    pairwise_lipschitz,
    prefix_bounds,
)
from lipverify.types import Norm

SAMPLES = 24


def _residual_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.1),
        ResidualBlock(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1)),
        nn.BatchNorm2d(4), nn.AvgPool2d(2), nn.Flatten(),
        ResidualBlock(nn.Linear(64, 64), GroupSort(2), nn.Linear(64, 64)),
        nn.Linear(64, 10))


def _mlp_tanh() -> nn.Module:
    return nn.Sequential(Normalize([0.3], [0.4]), nn.Flatten(), nn.Linear(64, 48), nn.Tanh(),
                         ResidualBlock(nn.Linear(48, 48), nn.LeakyReLU(0.2)),
                         nn.Linear(48, 32), nn.Sigmoid(), nn.Linear(32, 10))


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return module.eval()


NETWORKS = {
    "digits_mlp": lambda: load_shipped("digits_mlp"),
    "digits_cnn": lambda: load_shipped("digits_cnn"),
    "residual_cnn": lambda: _randomised(_residual_net(), 1),
    "tanh_mlp": lambda: _randomised(_mlp_tanh(), 2),
}


def _points(seed: int) -> torch.Tensor:
    x, _ = load_data("digits", limit=SAMPLES // 2)
    gen = torch.Generator().manual_seed(seed)
    rand = torch.rand((SAMPLES - len(x), *INPUT_SHAPE), generator=gen, dtype=torch.float64)
    return torch.cat([torch.from_numpy(x).double(), rand])


def _jacobians(fn, points: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for x in points:
        jac = torch.autograd.functional.jacobian(lambda z: fn(z[None])[0].reshape(-1), x,
                                                 vectorize=True)
        out.append(jac.reshape(jac.shape[0], -1))
    return out


@dataclass(frozen=True)
class Case:
    network: Network
    jacobians: list[torch.Tensor]
    bounds: dict[Norm, NetworkBounds]


@pytest.fixture(scope="module", params=sorted(NETWORKS))
def case(request):
    module = NETWORKS[request.param]()
    network = build_network(module, INPUT_SHAPE, name=request.param)
    reference = copy.deepcopy(module).double().eval()
    layers = network.require_layers()
    per_layer = [layer_bound(layer) for layer in layers]
    bounds = {norm: network_bounds(layers, network.input_size, network.num_outputs, norm,
                                   bounds=per_layer) for norm in Norm}
    return Case(network, _jacobians(reference, _points(0)), bounds)


def test_global_bounds_dominate_sampled_jacobians(case):
    network, jacs = case.network, case.jacobians
    l2 = max(float(torch.linalg.matrix_norm(j, ord=2)) for j in jacs)
    linf = max(float(j.abs().sum(dim=1).max()) for j in jacs)  # induced inf->inf norm
    b2, binf = case.bounds[Norm.L2], case.bounds[Norm.LINF]
    assert b2.global_value >= l2
    assert binf.global_value >= linf
    assert binf.global_value <= math.sqrt(network.input_size) * b2.global_value * (1 + 1e-9)


def test_pairwise_bounds_dominate_sampled_margin_gradients(case):
    network, jacs = case.network, case.jacobians
    p2, pinf = case.bounds[Norm.L2].pairwise(), case.bounds[Norm.LINF].pairwise()
    glob = case.bounds[Norm.L2].global_value
    k = network.num_outputs
    for jac in jacs:
        diff = jac[:, None, :] - jac[None, :, :]  # gradient of f_y - f_j
        assert np.all(p2 >= diff.norm(dim=2).numpy())
        assert np.all(pinf >= diff.abs().sum(dim=2).numpy())  # dual of inf is L1
    off = ~np.eye(k, dtype=bool)
    assert np.all(p2[off] <= math.sqrt(2) * glob * (1 + 1e-9))


def test_prefix_bounds_dominate_prefix_jacobians(case):
    layers = case.network.require_layers()
    bounds = prefix_bounds(layers)
    assert len(bounds) == len(layers)
    assert all(b > 0 for b in bounds)
    points = _points(1)[:4]
    for i in (0, len(layers) // 2, len(layers) - 2):
        prefix = layers[:i + 1]
        for jac in _jacobians(lambda z, p=prefix: run_layers(p, z), points):
            assert float(torch.linalg.matrix_norm(jac, ord=2)) <= bounds[i]


def test_row_lipschitz_dominates_sampled_row_gradients(case):
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((5, case.network.num_outputs))
    for norm, dual in ((Norm.L2, 2), (Norm.LINF, 1)):
        b = case.bounds[norm]
        for row in rows:
            lip = b.row_lipschitz(row)
            for jac in case.jacobians:
                grad = torch.from_numpy(row) @ jac
                assert float(grad.norm(p=dual)) <= lip


def test_simple_layers_and_residual_composition():
    n = 6
    assert layer_norm_bound(Reshape((1, 2, 3), (6,))) == 1.0
    assert layer_norm_bound(Shift(torch.ones(n, dtype=torch.float64), (n,))) == 1.0
    assert layer_norm_bound(Activation("groupsort", (n,), 2.0)) == 1.0
    assert layer_norm_bound(Activation("leaky_relu", (n,), 0.3)) == 1.0
    assert layer_norm_bound(Activation("sigmoid", (n,))) == 0.25
    w = torch.diag(torch.tensor([3.0, 1, 1, 1, 1, 1], dtype=torch.float64))
    dense = Dense(w, torch.zeros(n, dtype=torch.float64), (n,), (n,))
    block = Residual((dense, Activation("relu", (n,))), (n,))
    value = layer_norm_bound(block)
    assert 4.0 <= value <= 4.0 * (1 + 1e-9)
    assert layer_bound(block).linf >= 4.0
    # x + relu(3 x_0) has slope exactly 4 in the first coordinate: the bound is attained.
    x = torch.zeros(1, n, dtype=torch.float64, requires_grad=True)
    y = block.forward(x + 1.0)
    (g,) = torch.autograd.grad(y[0, 0], x)
    assert float(g[0, 0]) == 4.0


def test_pairwise_lipschitz_of_a_network_matches_its_bounds():
    network = build_network(load_shipped("digits_mlp"), INPUT_SHAPE)
    layers = network.require_layers()
    for norm in Norm:
        expected = network_bounds(layers, network.input_size, network.num_outputs,
                                  norm).pairwise()
        assert np.array_equal(pairwise_lipschitz(network, norm), expected)
