"""Convolution bounds against the exact operator norm of the layer's full matrix.

The reference is `Conv.matrix()` (the layer's own linear map applied to the identity, float64)
and `torch.linalg.matrix_norm(ord=2)`: independent of the Fourier, polyphase and reshape
machinery under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.extract import extract_layers
from lipverify.network.layers import Conv
from lipverify.norms.conv import (
    conv_explicit_bound,
    conv_gram_bound,
    conv_inf_norm_bound,
    conv_inf_to_two_bound,
    conv_matrix,
    conv_norm_bound,
    conv_semi_explicit_bound,
    fantastic_four_bound,
    polyphase,
    transposed,
)

REFERENCE_RTOL = 1e-12  # the float64 reference's own error
TIGHT = 1.02  # the acceptance ratio for trained-like 3x3 and 5x5 kernels

# (c_in, c_out, kernel, stride, padding, dilation, groups, height, width)
CONFIGS = [
    (2, 3, 3, 1, 1, 1, 1, 7, 6),
    (2, 4, 3, 2, 1, 1, 1, 7, 8),
    (3, 2, 3, 2, 0, 1, 1, 9, 9),
    (2, 2, 3, 1, 2, 1, 1, 6, 5),
    (2, 2, 3, 2, 2, 1, 1, 8, 7),
    (4, 4, 3, 1, 0, 2, 2, 8, 8),
    (3, 6, 5, 2, 2, 1, 3, 9, 10),
    (2, 2, 3, 2, 1, 3, 1, 11, 9),
    (2, 3, 2, 3, 0, 1, 1, 8, 8),
    (4, 4, 1, 1, 0, 1, 4, 5, 5),
    (1, 2, 5, 1, 2, 2, 1, 12, 11),
    (4, 2, 3, (2, 1), (1, 2), (1, 2), 2, 9, 10),
]


def _layer(module: nn.Module, shape: tuple[int, ...]) -> Conv:
    layers = [layer for layer in extract_layers(module, shape) if isinstance(layer, Conv)]
    assert len(layers) == 1
    return layers[0]


def _conv(cfg: tuple, seed: int = 0) -> Conv:
    ci, co, k, s, p, d, g, h, w = cfg
    torch.manual_seed(seed)
    return _layer(nn.Conv2d(ci, co, k, stride=s, padding=p, dilation=d, groups=g).double(),
                  (ci, h, w))


def _exact(layer: Conv) -> float:
    return float(torch.linalg.matrix_norm(layer.matrix(), ord=2))


def _smooth(weight: torch.Tensor) -> torch.Tensor:
    """Random kernels low-passed by a binomial filter: a stand-in for trained kernels."""
    co, ci, k, _ = weight.shape
    blur = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float64) / 16
    flat = F.pad(weight.reshape(-1, 1, k, k), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(flat, blur.view(1, 1, 3, 3)).reshape(co, ci, k, k)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_conv_matrix_is_the_layer_matrix(cfg):
    layer = _conv(cfg)
    assert np.array_equal(conv_matrix(layer).toarray(), layer.matrix().numpy())


@pytest.mark.parametrize("cfg", CONFIGS)
def test_every_conv_bound_is_at_least_the_exact_norm(cfg):
    layer = _conv(cfg)
    exact = _exact(layer)
    gram = conv_gram_bound(layer)
    values = {
        "gram": gram.value,
        "gram_plain_circulant": conv_gram_bound(layer, twist_candidates=1).value,
        "fantastic_four": fantastic_four_bound(layer),
        "semi_explicit": conv_semi_explicit_bound(layer, gram.twist),
        "explicit": conv_explicit_bound(layer).value,
        "combined": conv_norm_bound(layer).value,
    }
    for name, value in values.items():
        assert value >= exact * (1 - REFERENCE_RTOL), name
    assert values["explicit"] <= exact * (1 + 1e-6)


@pytest.mark.parametrize("cfg", CONFIGS[:6])
def test_transposed_layer_has_the_same_norm(cfg):
    layer = _conv(cfg)
    assert _exact(transposed(layer)) == pytest.approx(_exact(layer), rel=1e-12)


def _every_phase_used(cfg: tuple) -> bool:
    k, s, d = cfg[2], cfg[3], cfg[5]
    return d == 1 and all(k >= si for si in (s if isinstance(s, tuple) else (s, s)))


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if _every_phase_used(c)])
def test_polyphase_kernel_reproduces_the_layer(cfg):
    """Without dilation, the stride-1 correlation of the space-to-depth input IS the layer."""
    layer = _conv(cfg)
    pc = polyphase(layer)
    s1, s2 = layer.stride
    c, h, w = layer.in_shape
    n1, n2 = pc.grid
    x = torch.randn(3, c, h, w, dtype=torch.float64)
    body = F.pad(x, layer.padding)[:, :, :n1 * s1, :n2 * s2]
    padded = torch.zeros(3, c, n1 * s1, n2 * s2, dtype=torch.float64)
    padded[:, :, :body.shape[2], :body.shape[3]] = body
    z = padded.reshape(3, c, n1, s1, n2, s2).permute(0, 1, 3, 5, 2, 4)
    z = z.reshape(3, c * s1 * s2, n1, n2)
    kernel = torch.from_numpy(pc.kernel).reshape(-1, *pc.kernel.shape[2:])
    assert kernel.shape[1] == c // layer.groups * s1 * s2
    y = F.conv2d(z, kernel, groups=layer.groups)
    assert y.shape[2:] == (n1 - pc.kernel.shape[3] + 1, n2 - pc.kernel.shape[4] + 1)
    assert torch.allclose(y, layer.linear(x), rtol=0, atol=1e-12)


def test_shipped_cnn_kernels_are_bounded_tightly():
    layers = [la for la in extract_layers(load_shipped("digits_cnn"), INPUT_SHAPE)
              if isinstance(la, Conv)]
    assert len(layers) == 2
    for layer in layers:
        exact = _exact(layer)
        scalable = conv_norm_bound(layer, explicit_max_entries=0)  # no exact-matrix route
        assert exact * (1 - REFERENCE_RTOL) <= scalable.value <= TIGHT * exact
        assert conv_gram_bound(layer).value <= 1.03 * exact


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_smooth_kernels_on_16x16_are_bounded_tightly(k, stride):
    torch.manual_seed(10 * k + stride)
    module = nn.Conv2d(4, 4, k, stride=stride, padding=k // 2, bias=False).double()
    with torch.no_grad():
        module.weight.copy_(_smooth(module.weight))
    layer = _layer(module, (4, 16, 16))
    exact = _exact(layer)
    scalable = conv_norm_bound(layer, explicit_max_entries=0)
    assert exact * (1 - REFERENCE_RTOL) <= scalable.value <= TIGHT * exact
    if k == 3:  # the Gram bound alone: the circulant gap of 3x3 kernels is below 2 %
        assert conv_gram_bound(layer).value <= TIGHT * exact


def test_inf_norm_bounds_against_the_matrix():
    for cfg in CONFIGS:
        layer = _conv(cfg)
        m = layer.matrix().numpy()
        assert conv_inf_norm_bound(layer) >= np.max(np.sum(np.abs(m), axis=1))
        # inf->2 of a matrix <= sqrt(sum of squared row L1 norms) <= our bound
        assert conv_inf_to_two_bound(layer) >= np.sqrt(np.sum(np.sum(np.abs(m), axis=1) ** 2))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(ci=st.integers(1, 3), co_per=st.integers(1, 3), groups=st.integers(1, 2),
       k=st.integers(1, 4), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       dilation=st.tuples(st.integers(1, 3), st.integers(1, 2)),
       pad=st.tuples(st.integers(0, 2), st.integers(0, 2)), h=st.integers(4, 9),
       w=st.integers(4, 9), seed=st.integers(0, 10 ** 6))
def test_random_geometries_are_bounded_soundly(ci, co_per, groups, k, stride, dilation, pad, h,
                                               w, seed):
    span = [d * (k - 1) + 1 for d in dilation]
    assume(h + 2 * pad[0] >= span[0] and w + 2 * pad[1] >= span[1])
    torch.manual_seed(seed)
    module = nn.Conv2d(ci * groups, co_per * groups, k, stride=stride, padding=pad,
                       dilation=dilation, groups=groups).double()
    layer = _layer(module, (ci * groups, h, w))
    exact = _exact(layer)
    gram = conv_gram_bound(layer)
    assert gram.value >= exact * (1 - REFERENCE_RTOL)
    assert fantastic_four_bound(layer) >= exact * (1 - REFERENCE_RTOL)
    assert conv_semi_explicit_bound(layer, gram.twist) >= exact * (1 - REFERENCE_RTOL)
