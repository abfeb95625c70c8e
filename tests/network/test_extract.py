import math

import pytest
import torch
from torch import nn

from lipverify.errors import UnsupportedLayerError
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.extract import extract_layers
from lipverify.network.layers import Conv, Dense, Residual, Shift, run_layers
from lipverify.network.modules import GroupSort, Normalize, ResidualBlock


def _agree(model, shape, layers=None):
    torch.manual_seed(1)
    model = model.double().eval()
    layers = layers or extract_layers(model, shape)
    x = torch.randn((16, *shape), dtype=torch.float64)
    with torch.no_grad():
        ref = model(x).reshape(16, -1)
        got = run_layers(layers, x).reshape(16, -1)
    assert torch.allclose(ref, got, atol=1e-10), (ref - got).abs().max()
    return layers


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_shipped_models(name):
    _agree(load_shipped(name), INPUT_SHAPE)


def test_batchnorm_and_normalisation_fold_exactly():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    model = nn.Sequential(Normalize([0.4, 0.5], [0.2, 0.3]), nn.Conv2d(2, 4, 3, padding=1), bn,
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3), nn.BatchNorm1d(3))
    model[-1].running_mean.uniform_(-1, 1)
    layers = _agree(model, (2, 6, 6))
    # normalisation shift before a padded conv stays a translation; BNs fold away
    assert isinstance(layers[0], Shift)
    assert sum(isinstance(x, (Conv, Dense)) for x in layers) == 2


def test_normalisation_before_unpadded_conv_folds_completely():
    model = nn.Sequential(Normalize([0.4, 0.5], [0.2, 0.3]), nn.Conv2d(2, 3, 3), nn.ReLU())
    layers = _agree(model, (2, 5, 5))
    assert isinstance(layers[0], Conv)


def test_pad_pool_residual_groupsort_leaky():
    model = nn.Sequential(nn.ZeroPad2d((1, 0, 2, 1)), nn.Conv2d(1, 4, 3, stride=2),
                          nn.LeakyReLU(0.1), nn.AvgPool2d(2),
                          ResidualBlock(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()),
                          nn.Flatten(), nn.Linear(16, 6), GroupSort(2), nn.Sigmoid(),
                          nn.Linear(6, 2))
    layers = _agree(model, (1, 9, 8))
    assert isinstance(layers[0], Conv) and layers[0].padding == (1, 0, 2, 1)
    assert any(isinstance(x, Residual) for x in layers)


def test_unsupported_layer_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1))
    with pytest.raises(UnsupportedLayerError, match=r"1 \(Softmax\)"):
        extract_layers(model, (4,))


def test_conv_matrix_and_adjoint_are_consistent():
    torch.manual_seed(0)
    layers = extract_layers(nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1)), (2, 5, 5))
    conv = layers[0]
    m = conv.matrix()
    x = torch.randn(1, *conv.in_shape, dtype=torch.float64)
    y = torch.randn(1, *conv.out_shape, dtype=torch.float64)
    assert torch.allclose(conv.linear(x).reshape(-1), m @ x.reshape(-1))
    assert torch.allclose(conv.adjoint(y).reshape(-1), m.T @ y.reshape(-1))
    assert m.shape == (math.prod(conv.out_shape), math.prod(conv.in_shape))
