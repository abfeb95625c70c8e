"""The fx graph walk and the folding it relies on, against the modules themselves (float64)."""

import pytest
import torch
from torch import nn

from lipverify.errors import UnsupportedLayerError
from lipverify.network.extract import Diagonal, extract_layers, fold
from lipverify.network.fx_extract import PerSample, fx_layers
from lipverify.network.layers import Activation, Conv, Dense, Reshape, Residual, Shift, run_layers
from lipverify.network.modules import GroupSort, Normalize


def _agree(model, shape, batch=5):
    torch.manual_seed(0)
    model = model.double().eval()
    layers = fx_layers(model, shape)
    x = torch.randn((batch, *shape), dtype=torch.float64)
    with torch.no_grad():
        ref = model(x).reshape(batch, -1)
        got = run_layers(layers, x).reshape(batch, -1)
    assert torch.allclose(ref, got, atol=1e-10), (ref - got).abs().max()
    return layers


class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(torch.flatten(-(x - 0.5) / 0.25 + 1.0, 1))


def test_elementwise_constants_fold_into_the_dense_layer():
    layers = _agree(Affine(), (3, 2, 2))
    assert [type(layer) for layer in layers] == [Reshape, Dense]


class TwoResiduals(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)
        self.out = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        x = x + self.c1(torch.relu(x))
        x = torch.relu(x)
        x = self.c2(x) + x  # the skip on the right
        return self.out(x.view(x.size(0), -1))


def test_residual_blocks_on_both_sides():
    layers = _agree(TwoResiduals(), (2, 4, 4))
    residuals = [layer for layer in layers if isinstance(layer, Residual)]
    assert len(residuals) == 2
    assert [type(layer) for layer in residuals[0].body] == [Activation, Conv]


class MatmulParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 5, 3))
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, x):  # a matmul on a 2-D sample: one dense layer over the flattened sample
        return torch.matmul(x, self.w[0]) + self.b


def test_matmul_on_multi_dim_sample_becomes_dense():
    layers = _agree(MatmulParam(), (4, 5))
    assert isinstance(layers[0], Dense) and layers[0].weight.shape == (12, 20)


def test_lipverify_modules_stay_whole():
    model = nn.Sequential(Normalize([0.1, 0.2], [0.5, 2.0]), nn.Conv2d(2, 4, 3, padding=1),
                          nn.Flatten(), GroupSort(2), nn.Linear(64, 2))

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m(x) * 3.0

    layers = _agree(Wrapped(), (2, 4, 4))
    assert isinstance(layers[0], Shift) and isinstance(layers[1], Conv)
    assert any(isinstance(layer, Activation) and layer.kind == "groupsort" for layer in layers)


@pytest.mark.parametrize("body,name", [(lambda x: torch.sin(x), "sin"),
                                       (lambda x: torch.cat([x, x], 1), "cat"),
                                       (lambda x: x * x, "mul"),
                                       (lambda x: torch.relu(x) + torch.tanh(x), "add"),
                                       (lambda x: 1.0 / x, "truediv"),
                                       (lambda x: torch.abs(x), "abs"),
                                       (lambda x: x.transpose(0, 1), "transpose")])
def test_unsupported_ops_are_named(body, name):
    class Odd(nn.Module):
        def forward(self, x):
            return body(x)

    with pytest.raises(UnsupportedLayerError, match=name) as info:
        fx_layers(Odd(), (3, 3))
    assert info.value.backends == ("attack", "lirpa")


def test_data_dependent_control_flow_is_unsupported():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedLayerError, match="Branchy"):
        fx_layers(Branchy(), (3,))


def test_per_sample_graphs():
    w = torch.randn(2, 3, dtype=torch.float64)

    class OneSample(nn.Module):  # takes a vector with no batch dimension
        def forward(self, x):
            return torch.relu(w @ x + 1.0)

    module = PerSample(OneSample(), batch_dim=False)
    x = torch.randn(4, 3, dtype=torch.float64)
    layers = fx_layers(module, (3,))
    assert torch.allclose(run_layers(layers, x), module(x), atol=1e-12)

    class BatchOfOne(nn.Module):  # a batch of exactly one baked in
        def forward(self, x):
            return torch.reshape(x, (1, 6)) @ w.T.repeat(2, 1)

    module = PerSample(BatchOfOne(), batch_dim=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    layers = fx_layers(module, (2, 3))
    assert torch.allclose(run_layers(layers, x), module(x), atol=1e-12)


def test_fold_composes_diagonals_and_moves_them_past_reshapes():
    shape = (2, 2, 2)
    d1 = Diagonal(torch.tensor([2.0, 3.0], dtype=torch.float64),
                  torch.tensor([1.0, -1.0], dtype=torch.float64), shape)
    d2 = Diagonal(torch.tensor([0.5, 0.5], dtype=torch.float64),
                  torch.tensor([0.0, 2.0], dtype=torch.float64), shape)
    dense = Dense(torch.randn(3, 8, dtype=torch.float64), torch.randn(3, dtype=torch.float64),
                  (8,), (3,))
    items = [d1, d2, Reshape(shape, (8,)), dense]
    layers = fold(items)
    assert [type(layer) for layer in layers] == [Reshape, Dense]
    x = torch.randn(4, *shape, dtype=torch.float64)
    ref = dense.forward((d2.full(d2.scale) * (d1.full(d1.scale) * x + d1.full(d1.shift))
                         + d2.full(d2.shift)).reshape(4, 8))
    assert torch.allclose(run_layers(tuple(layers), x), ref, atol=1e-12)


def test_unit_scale_diagonal_is_a_shift_and_pad_then_conv_is_one_conv():
    shape = (2, 3, 3)
    unit = Diagonal(torch.ones(2, dtype=torch.float64), torch.tensor([1.0, 2.0],
                                                                      dtype=torch.float64), shape)
    assert [type(layer) for layer in fold([unit, Activation("relu", shape)])] == [Shift,
                                                                                  Activation]
    model = nn.Sequential(Normalize([0.3, 0.6], [0.5, 0.25]), nn.ZeroPad2d(1), nn.Conv2d(2, 3, 3),
                          nn.ReLU()).double().eval()
    layers = extract_layers(model, shape)
    assert [type(layer) for layer in layers] == [Shift, Conv, Activation]
    assert layers[1].padding == (1, 1, 1, 1)
    x = torch.randn(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(run_layers(layers, x), model(x), atol=1e-12)


class Permuted(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 2)

    def forward(self, x):  # NCHW -> NHWC, then flatten: a permutation, so a dense layer
        return self.fc(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))


def test_permutations_become_dense_layers():
    layers = _agree(Permuted(), (2, 3, 4))
    assert [type(layer) for layer in layers] == [Dense, Reshape, Dense]
    perm = layers[0].weight
    assert torch.equal(perm @ perm.T, torch.eye(24, dtype=torch.float64))
