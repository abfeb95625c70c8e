"""A BCOP-style orthogonal convnet trained here: spectral certificates match its guarantee of 1.

Independent evidence: each layer's exact operator norm (the full matrix of the layer's linear
map and an SVD), the empirical Jacobian lower bound, and margins read off a forward pass.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.backends.spectral import SpectralBackend
from lipverify.data import digits_split
from lipverify.lower_bounds import jacobian_lower_bound
from lipverify.models.orthogonal_layers import (
    BCOPConv2d,
    OrthogonalDownsample,
    OrthogonalLinear,
    digits_orthogonal_cnn,
    export_plain,
    train_digits,
)
from lipverify.network.extract import extract_layers
from lipverify.network.fx_extract import fx_layers
from lipverify.network.layers import Activation, Conv, Dense, run_layers
from lipverify.network.load import load_network
from lipverify.network.modules import GroupSort, MaxMin
from lipverify.norms.network import layer_bound
from lipverify.types import Norm, Perturbation, Problem

GUARANTEE_TOL = 1e-5  # certified bound <= 1 + this (the construction guarantees exactly 1)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    torch.manual_seed(0)
    model = digits_orthogonal_cnn(seed=0)
    accuracy = train_digits(model, epochs=4, seed=0)
    assert accuracy > 0.9  # it learned something: a real trained network, not an initialisation
    return model


@pytest.fixture(scope="module")
def network(trained):
    return load_network(trained, (1, 8, 8))


def test_every_layer_is_orthogonal_and_bounded_by_one(network):
    assert network.layers is not None  # the layer view survived its float64 check
    for layer in network.layers:
        bound = layer_bound(layer)
        if isinstance(layer, (Dense, Conv)):
            matrix = layer.matrix() if isinstance(layer, Conv) else layer.weight
            exact = float(torch.linalg.matrix_norm(matrix.double(), ord=2))
            assert exact <= 1 + 1e-6
            assert bound.l2 >= exact * (1 - 1e-12)
            assert bound.l2 < 1 + 1e-6
            assert bound.candidates["orthogonal"] < 1 + 1e-6
        if isinstance(layer, Dense):  # 64 -> 10 with orthonormal rows
            w = layer.weight.double()
            assert torch.allclose(w @ w.T, torch.eye(10, dtype=torch.float64), atol=1e-6)


def test_global_certificate_matches_the_construction(network):
    bound = SpectralBackend().lipschitz(network, Norm.L2)
    # below 1 is possible: zero padding on a 2x2 image cuts off a little of a BCOP conv's output
    assert 0.999 < bound.value <= 1 + GUARANTEE_TOL
    assert "orthogonal" in bound.details["methods"]
    x, _, _, _ = digits_split()
    lower = jacobian_lower_bound(network, x[:64], seed=0)
    assert lower.value <= bound.value
    assert lower.value > 0.5  # GroupSort networks are gradient-norm preserving: close to 1


def test_margin_radii_are_margin_over_sqrt2(network, trained):
    _, _, x, y = digits_split()
    x, y = x[:40], y[:40]
    out = run_layers(network.layers, torch.as_tensor(x, dtype=torch.float64)).numpy()
    top2 = np.sort(out, axis=1)[:, -2:]
    correct = out.argmax(1) == y
    margin = top2[:, 1] - top2[:, 0]
    problem = Problem.robustness(x, y, 10, Perturbation.ball("2", 0.01), want_radius=True)
    radii = np.array([c.radius for c in SpectralBackend().certify(network, problem)])
    assert correct.sum() > 30
    guarantee = margin[correct] / math.sqrt(2)  # what the construction (L = 1) guarantees
    assert np.all(radii[correct] >= guarantee / (1 + GUARANTEE_TOL))
    # and exactly what the certified L (a hair below 1: zero padding on 2x2 images) implies,
    # since the orthonormal rows of the last layer give ||w_y - w_j|| = sqrt(2)
    certified = SpectralBackend().lipschitz(network, Norm.L2).value
    assert np.allclose(radii[correct], guarantee / certified, rtol=1e-6, atol=0)
    assert np.all(radii[~correct] == 0)


def test_plain_export_computes_the_same_and_certifies_the_same(trained, network):
    plain = export_plain(trained)
    assert all(type(m) in (nn.Conv2d, nn.Linear, MaxMin, nn.Flatten) for m in plain)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(plain(x), trained(x))
    same = load_network(plain, (1, 8, 8))
    assert SpectralBackend().lipschitz(same, Norm.L2).value == \
        SpectralBackend().lipschitz(network, Norm.L2).value


class _Branchy(nn.Module):
    """Not a Sequential: read through the fx path."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(6, 8), nn.Linear(8, 3), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


@pytest.mark.parametrize("act", [MaxMin(), GroupSort(4)])
def test_maxmin_and_groupsort_are_one_lipschitz_on_both_module_paths(act):
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 3))
    for layers in (extract_layers(seq, (6,)), fx_layers(_Branchy(act), (6,))):
        (mid,) = [la for la in layers if isinstance(la, Activation)]
        assert (mid.kind, mid.param) == ("groupsort", float(act.group_size))
        assert layer_bound(mid).l2 == 1.0
    # sorting within groups: 1-Lipschitz on sampled pairs, and norm-preserving
    x, z = torch.randn(500, 8, dtype=torch.float64), torch.randn(500, 8, dtype=torch.float64)
    assert torch.all((act(x) - act(z)).norm(dim=1) <= (x - z).norm(dim=1) * (1 + 1e-12))
    assert torch.allclose(act(x).norm(dim=1), x.norm(dim=1))


class _OrthogonalBranchy(nn.Module):
    """The orthogonal layers outside a Sequential: read through the fx path."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.down, self.conv = OrthogonalDownsample(1, gen), BCOPConv2d(4, 3, gen)
        self.act, self.head = MaxMin(), OrthogonalLinear(64, 10, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.act(self.conv(self.down(x))), 1))


def test_parametrised_layers_are_read_through_the_fx_path():
    net = load_network(_OrthogonalBranchy(), (1, 8, 8))
    assert [type(la).__name__ for la in net.layers] == ["Conv", "Conv", "Activation", "Reshape",
                                                         "Dense"]
    assert SpectralBackend().lipschitz(net, Norm.L2).value <= 1 + GUARANTEE_TOL
