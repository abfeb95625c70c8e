"""`layers_to_module` rebuilds a module equal to the original on random inputs."""

import pytest
import torch
from torch import nn

from lipverify.errors import UnsupportedLayerError
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.extract import extract_layers
from lipverify.network.layers import Conv, Reshape, Shift
from lipverify.network.modules import GroupSort, Normalize, ResidualBlock
from lipverify.network.torchify import (
    AddConstant,
    View,
    conv_after_reshape,
    has_asymmetric_padding,
    layers_to_module,
    needs_matrix_mode,
)


def _bn(c, seed):
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    bn.running_mean.copy_(torch.randn(c, generator=gen))
    bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    bn.weight.data.copy_(torch.randn(c, generator=gen))
    bn.bias.data.copy_(torch.randn(c, generator=gen))
    return bn


def _models():
    torch.manual_seed(0)
    yield "mlp", load_shipped("digits_mlp"), INPUT_SHAPE
    yield "cnn", load_shipped("digits_cnn"), INPUT_SHAPE
    yield "norm_bn_asym", nn.Sequential(
        Normalize([0.3, 0.5], [0.2, 0.4]), nn.ZeroPad2d((1, 0, 2, 1)), nn.Conv2d(2, 4, 3),
        _bn(4, 1), nn.LeakyReLU(0.1), nn.Conv2d(4, 3, 2, stride=2, padding=1, dilation=1),
        nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 4, 6), nn.Sigmoid(), nn.Linear(6, 3)), (2, 9, 7)
    yield "unflatten_conv", nn.Sequential(
        nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Unflatten(1, (2, 4, 4)),
        nn.Conv2d(2, 3, 3, padding=1, groups=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(12, 4)), (1, 4, 4)
    yield "residual_groupsort", nn.Sequential(
        nn.Flatten(), nn.Linear(8, 6), ResidualBlock(nn.Linear(6, 6), GroupSort(2),
                                                      nn.Linear(6, 6)), nn.Linear(6, 2)), (8,)
    yield "normalize_before_padded_conv", nn.Sequential(
        Normalize([0.5], [0.25]), nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(2 * 5 * 5, 3)), (1, 5, 5)
    yield "depthwise_same", nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same"), nn.ReLU(), nn.Conv2d(4, 4, 2, padding="same",
                                                                  groups=4),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 2)), (2, 6, 6)


@pytest.mark.parametrize("name,module,shape", list(_models()), ids=lambda v: v if
                         isinstance(v, str) else "")
def test_rebuilt_module_equals_original(name, module, shape):
    module = module.eval()
    layers = extract_layers(module, shape)
    rebuilt = layers_to_module(layers, shape)
    assert all(p.dtype == torch.float32 for p in rebuilt.parameters())
    assert not rebuilt.training
    x = torch.randn((64, *shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = module(x).double()
        got = rebuilt(x).double()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()


def test_padding_kept_inside_conv_when_symmetric():
    layers = extract_layers(load_shipped("digits_cnn"), INPUT_SHAPE)
    rebuilt = layers_to_module(layers)
    kinds = [type(m) for m in rebuilt]
    assert nn.ZeroPad2d not in kinds
    assert [m.padding for m in rebuilt if isinstance(m, nn.Conv2d)] == [(1, 1), (1, 1)]
    assert not has_asymmetric_padding(layers)


def test_asymmetric_padding_becomes_zeropad():
    module = nn.Sequential(nn.ZeroPad2d((1, 0, 0, 1)), nn.Conv2d(1, 2, 2)).eval()
    layers = extract_layers(module, (1, 4, 4))
    assert isinstance(layers[0], Conv) and layers[0].padding == (1, 0, 0, 1)
    assert has_asymmetric_padding(layers)
    rebuilt = layers_to_module(layers)
    assert isinstance(rebuilt[0], nn.ZeroPad2d) and rebuilt[1].padding == (0, 0)


def test_shift_and_reshape_modules():
    layers = extract_layers(dict((n, (m, s)) for n, m, s in _models())
                            ["normalize_before_padded_conv"][0], (1, 5, 5))
    assert any(isinstance(layer, Shift) for layer in layers)
    rebuilt = layers_to_module(layers)
    assert any(isinstance(m, AddConstant) for m in rebuilt)
    unflat = extract_layers(nn.Sequential(nn.Flatten(), nn.Unflatten(1, (1, 2, 2))), (4,))
    assert isinstance(unflat[-1], Reshape)
    rebuilt = layers_to_module(unflat)
    assert not any(isinstance(m, nn.Unflatten) for m in rebuilt.modules())
    assert any(isinstance(m, View) for m in rebuilt)


def test_conv_after_reshape_detection():
    shapes = {n: s for n, _, s in _models()}
    modules = {n: m for n, m, _ in _models()}
    assert conv_after_reshape(extract_layers(modules["unflatten_conv"], shapes["unflatten_conv"]))
    assert not conv_after_reshape(extract_layers(modules["cnn"], INPUT_SHAPE))
    assert not conv_after_reshape(extract_layers(modules["mlp"], INPUT_SHAPE))


def test_empty_layers_rejected():
    with pytest.raises(UnsupportedLayerError):
        layers_to_module(())


def test_matrix_mode_for_flat_residuals_and_reshaped_convs():
    modules = {n: (m, s) for n, m, s in _models()}
    res, shape = modules["residual_groupsort"]
    assert needs_matrix_mode(extract_layers(res, shape))
    conv, shape = modules["unflatten_conv"]
    assert needs_matrix_mode(extract_layers(conv, shape))
    assert not needs_matrix_mode(extract_layers(modules["cnn"][0], INPUT_SHAPE))
