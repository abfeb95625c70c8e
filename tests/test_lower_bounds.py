"""Empirical Lipschitz lower bounds against exact constants (SVD, enumeration of ReLU patterns)."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.data import digits_split
from lipverify.errors import InputError
from lipverify.lower_bounds import (
    LowerBoundOptions,
    bilipschitz_lower_estimate,
    jacobian_lower_bound,
    pairwise_lower_bound,
    row_lower_bounds,
)
from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.load import load_network
from lipverify.types import Norm


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _linear(n_in, n_out, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, n_out))
    return load_network(model), model[0].weight.detach().double().numpy()


def _exact(w, norm):
    """Operator norm of W: spectral (L2) or largest row L1 norm (L-infinity)."""
    return np.linalg.norm(w, 2) if norm == Norm.L2 else np.abs(w).sum(axis=1).max()


@pytest.mark.parametrize("norm", [Norm.L2, Norm.LINF])
@pytest.mark.parametrize("with_data", [False, True])
def test_linear_network_reaches_the_exact_constant(norm, with_data):
    net, w = _linear(7, 4)
    data = np.random.default_rng(0).random((5, 7)) if with_data else None
    bound = jacobian_lower_bound(net, data, norm=norm, seed=1)
    exact = _exact(w, norm)
    assert bound.norm == norm
    assert bound.value <= exact
    assert bound.value >= 0.99 * exact
    assert bound.method in ("data", "random", "ascent")


@pytest.mark.parametrize("norm", [Norm.L2, Norm.LINF])
def test_pairwise_on_linear_network(norm):
    net, w = _linear(6, 4, seed=2)
    values = pairwise_lower_bound(net, norm=norm, seed=0).values
    dual = 2 if norm == Norm.L2 else 1
    for a, b in itertools.permutations(range(4), 2):
        exact = np.linalg.norm(w[a] - w[b], dual)
        assert 0.99 * exact <= values[a, b] <= exact
    assert np.all(np.diag(values) == 0)


@pytest.mark.parametrize("norm", [Norm.L2, Norm.LINF])
def test_row_bounds_on_linear_network(norm):
    """A row `c` of a linear map has Lipschitz constant `||c W||` (dual norm) everywhere."""
    net, w = _linear(6, 4, seed=3)
    rows = np.random.default_rng(1).normal(size=(5, 4))
    points = np.random.default_rng(2).random((3, 6))
    values = row_lower_bounds(net, points, rows, norm=norm)
    dual = 2 if norm == Norm.L2 else 1
    exact = np.linalg.norm(rows @ w, dual, axis=1)
    assert np.all(values <= exact) and np.all(values >= 0.99 * exact)


def test_row_bounds_below_the_true_constant_of_a_relu_net():
    """On a ReLU net each row's bound is at most the largest gradient norm over all linear
    pieces the inputs can reach (enumerated on a dense sample): never above the truth."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3))
    net = load_network(model)
    rows = np.array([[1.0, -1.0, 0.0], [0.0, 2.0, -0.5]])
    values = row_lower_bounds(net, np.random.default_rng(0).normal(size=(4, 2)), rows)
    w1, w2 = (m.weight.detach().double().numpy() for m in (model[0], model[2]))
    truth = np.zeros(len(rows))
    for pattern in itertools.product([0.0, 1.0], repeat=6):
        g = rows @ w2 @ (np.array(pattern)[:, None] * w1)
        truth = np.maximum(truth, np.linalg.norm(g, axis=1))
    assert np.all(values <= truth) and np.all(values > 0)


def test_relu_network_below_the_pattern_enumeration():
    """One hidden ReLU layer: the constant is at most max over all 2^h activation patterns D of
    ||W2 D W1|| (each pattern's map is one of the network's local linear maps or more)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    w1 = model[0].weight.detach().double().numpy()
    w2 = model[2].weight.detach().double().numpy()
    upper = {Norm.L2: 0.0, Norm.LINF: 0.0}
    for pattern in itertools.product([0.0, 1.0], repeat=8):
        local = w2 @ np.diag(pattern) @ w1
        for norm in upper:
            upper[norm] = max(upper[norm], _exact(local, norm))
    net = load_network(model)
    for norm, limit in upper.items():
        bound = jacobian_lower_bound(net, norm=norm, seed=0)
        assert 0 < bound.value <= limit
        assert bound.value >= 0.5 * limit  # random points and the ascent find a big region


def test_digits_cnn_bounds_are_consistent():
    net = load_network(load_shipped("digits_cnn"), INPUT_SHAPE)
    _, _, x, _ = digits_split()
    model = load_shipped("digits_cnn").double()
    product = 1.0  # spectral norms of the unrolled convolutions and dense layers: an upper bound
    shape = INPUT_SHAPE
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            n = int(np.prod(shape))
            eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
            with torch.no_grad():
                out = nn.functional.conv2d(eye, layer.weight, None, layer.stride, layer.padding)
            product *= np.linalg.norm(out.reshape(n, -1).numpy(), 2)
            shape = tuple(out.shape[1:])
        elif isinstance(layer, nn.Linear):
            product *= np.linalg.norm(layer.weight.detach().numpy(), 2)
    quick = LowerBoundOptions(random_points=16, ascent_starts=4, ascent_steps=10)
    data_only = jacobian_lower_bound(net, x[:40], seed=0,
                                     options=LowerBoundOptions(random_points=0, ascent_steps=0))
    full = jacobian_lower_bound(net, x[:40], seed=0, options=quick)
    assert 0 < data_only.value <= full.value * (1 + 1e-12) and full.value <= product
    again = jacobian_lower_bound(net, x[:40], seed=0, options=quick)
    assert again.value == full.value  # seeded
    pairs = pairwise_lower_bound(net, x[:40], seed=0, options=quick).values
    assert pairs.shape == (10, 10) and np.all(pairs <= 2 * full.value * (1 + 1e-9))


def test_inverse_estimate_on_linear_maps():
    net, w = _linear(3, 5, seed=5)  # injective: the lower constant is the smallest singular value
    est = bilipschitz_lower_estimate(net, seed=0)
    sigma_min = np.linalg.svd(w, compute_uv=False).min()
    assert sigma_min * (1 - 1e-9) <= est.value <= 1.01 * sigma_min
    assert "estimate" in est.label
    wide, _ = _linear(6, 2, seed=6)  # a 2-D image of a 6-D space squeezes some direction to 0
    assert bilipschitz_lower_estimate(wide, seed=0).value < 1e-8


def test_data_of_the_wrong_size_is_refused():
    net, _ = _linear(4, 2)
    with pytest.raises(InputError, match="4"):
        jacobian_lower_bound(net, np.zeros((3, 5)))
