"""Gram-deviation bounds of near-orthogonal layers against exact norms and exact arithmetic.

References: the exact operator norm of the layer's full matrix (`Conv.matrix()`, the layer's own
linear map applied to the identity, and an SVD), Gram deviations computed in rational arithmetic
(`fractions`), and the isometry of a BCOP convolution checked on the infinite grid ('full'
padding, so no output is cut off).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lipverify.models.orthogonal_layers import bcop_kernel, orthogonal_matrix
from lipverify.network.extract import extract_layers
from lipverify.network.layers import Conv
from lipverify.norms.conv import conv_norm_bound, polyphase
from lipverify.norms.network import layer_bound
from lipverify.norms.orthogonal import (
    dense_orthogonal_bound,
    grouped_orthogonal_bound,
    kernel_gram_deviation,
)

REFERENCE_RTOL = 1e-12  # the float64 SVD reference's own error


def _orthogonal(n: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _svd_norm(a: np.ndarray | torch.Tensor) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64), 2))


def _conv_layer(weight: torch.Tensor, shape: tuple[int, int, int], stride: int = 1,
                padding: int = 0, dilation: int = 1, groups: int = 1) -> Conv:
    co, ci_g, k1, k2 = weight.shape
    conv = nn.Conv2d(ci_g * groups, co, (k1, k2), stride, padding, dilation, groups).double()
    with torch.no_grad():
        conv.weight.copy_(weight)
    (layer,) = extract_layers(conv, shape)
    return layer


def _exact(layer: Conv) -> float:
    return float(torch.linalg.matrix_norm(layer.matrix(), ord=2))


@pytest.mark.parametrize(("m", "n"), [(8, 8), (12, 5), (5, 12), (64, 10), (10, 64)])
def test_orthogonal_dense_bound_is_one_to_float_precision(m, n):
    q = _orthogonal(max(m, n), m * 100 + n)[:m, :n]
    for w in (q, q.astype(np.float32).astype(np.float64)):  # float64, and as stored in float32
        bound = dense_orthogonal_bound(w)
        assert bound.value >= _svd_norm(w) * (1 - REFERENCE_RTOL)
        assert abs(bound.value - 1) < 1e-6
        assert bound.near_orthogonal
        assert bound.side == ("gram" if m >= n else "cogram")


@pytest.mark.parametrize("seed", range(6))
def test_dense_deviation_bounds_the_exact_rational_deviation(seed):
    rng = np.random.default_rng(seed)
    n = 6
    w = (_orthogonal(n, seed) + 1e-4 * rng.standard_normal((n, n))).astype(np.float32)
    w = w.astype(np.float64)
    frac = [[Fraction(float(v)) for v in row] for row in w]
    exact = np.array([[float(sum(frac[k][i] * frac[k][j] for k in range(n))
                             - (1 if i == j else 0)) for j in range(n)] for i in range(n)])
    deviation = float(kernel_gram_deviation(w[None, :, :, None, None])[0])
    assert deviation >= _svd_norm(exact) * (1 - 1e-9)  # float(exact) is off by ~1e-16 absolute
    assert deviation <= 3 * np.linalg.norm(exact, "fro")  # and it is not vacuous


@pytest.mark.parametrize("seed", range(8))
def test_dense_bound_is_sound_for_any_matrix(seed):
    rng = np.random.default_rng(seed)
    m, n = rng.integers(1, 20, 2)
    w = rng.standard_normal((m, n)) * 10.0 ** rng.uniform(-2, 2)
    assert dense_orthogonal_bound(w).value >= _svd_norm(w) * (1 - REFERENCE_RTOL)


def _bcop(c: int, k: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    raw = scale * torch.randn((2 * k - 1, c, c), generator=gen, dtype=torch.float64)
    return bcop_kernel(raw, k)


@pytest.mark.parametrize(("c", "k"), [(2, 2), (4, 3), (6, 3), (3, 5)])
def test_bcop_kernel_is_an_isometry_of_the_infinite_grid(c, k):
    w = _bcop(c, k, seed=c + k)
    # 'full' padding keeps every output the infinite grid would hold: the map is an isometry
    full = _conv_layer(w, (c, 5, 6), padding=k - 1)
    gram = full.matrix().T @ full.matrix()
    assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, c, 5, 6, dtype=torch.float64)
    y = F.conv2d(x, w, padding=k - 1)
    assert torch.allclose(y.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-12)


@pytest.mark.parametrize(("c", "k", "size"), [(4, 3, 6), (6, 3, 5), (3, 5, 7), (4, 3, 2)])
def test_bcop_conv_bound_is_one_and_above_the_exact_norm(c, k, size):
    w = _bcop(c, k, seed=10 * c + k).float().double()  # as a float32 model stores it
    layer = _conv_layer(w, (c, size, size), padding=k // 2)
    exact = _exact(layer)
    orth = grouped_orthogonal_bound(polyphase(layer).kernel)
    assert orth.value >= exact * (1 - REFERENCE_RTOL)
    assert abs(orth.value - 1) < 1e-6
    full = conv_norm_bound(layer, explicit_max_entries=0)  # no exact matrix: a 'large' layer
    assert full.method == "orthogonal"
    assert "gram" not in full.candidates  # near-orthogonal: Gram iteration skipped
    assert exact * (1 - REFERENCE_RTOL) <= full.value < 1 + 1e-4


def test_invertible_downsampling_is_orthogonal_through_the_polyphase_kernel():
    c = 3
    gen = torch.Generator().manual_seed(0)
    q = orthogonal_matrix(torch.randn(4 * c, 4 * c, dtype=torch.float64, generator=gen))
    w = q.reshape(4 * c, c, 2, 2)
    layer = _conv_layer(w, (c, 6, 8), stride=2)
    assert _exact(layer) == pytest.approx(1.0, abs=1e-12)  # an isometry on even sizes
    bound = layer_bound(layer)
    # the orthogonal bound is exact up to rounding (1 + 3e-14 measured), and it is the one kept
    assert bound.method == "orthogonal"
    assert bound.l2 == min(bound.candidates.values())
    assert 1 - REFERENCE_RTOL <= bound.l2 < 1 + 1e-10


@pytest.mark.parametrize("noise", [1e-6, 1e-3, 1e-1])
def test_near_orthogonal_conv_bound_is_sound_and_degrades_gracefully(noise):
    gen = torch.Generator().manual_seed(3)
    w = _bcop(4, 3, seed=4) + noise * torch.randn((4, 4, 3, 3), generator=gen,
                                                  dtype=torch.float64)
    layer = _conv_layer(w, (4, 6, 6), padding=1)
    exact = _exact(layer)
    bound = grouped_orthogonal_bound(polyphase(layer).kernel)
    assert bound.value >= exact * (1 - REFERENCE_RTOL)
    assert bound.value - 1 < 50 * noise  # sqrt(1 + O(noise)): within a modest factor
    assert bound.near_orthogonal == (noise < 1e-4)
    assert conv_norm_bound(layer).value >= exact * (1 - REFERENCE_RTOL)


# (c_in, c_out, kernel, stride, padding, dilation, groups, height, width)
CONFIGS = [
    (2, 3, 3, 1, 1, 1, 1, 7, 6),
    (2, 4, 3, 2, 1, 1, 1, 7, 8),
    (4, 4, 3, 1, 0, 2, 2, 8, 8),
    (3, 6, 5, 2, 2, 1, 3, 9, 10),
    (2, 2, 3, 2, 1, 3, 1, 11, 9),
    (4, 4, 1, 1, 0, 1, 4, 5, 5),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_conv_orthogonal_bound_is_sound_for_any_kernel(cfg):
    ci, co, k, s, p, d, g, h, w = cfg
    torch.manual_seed(sum(cfg))
    weight = torch.randn(co, ci // g, k, k, dtype=torch.float64) * 0.3
    layer = _conv_layer(weight, (ci, h, w), s, p, d, g)
    assert grouped_orthogonal_bound(polyphase(layer).kernel).value >= \
        _exact(layer) * (1 - REFERENCE_RTOL)
