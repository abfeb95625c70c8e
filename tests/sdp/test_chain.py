"""Layer views into LipSDP chains: exact matrices, identity separators, refusals."""

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.models import INPUT_SHAPE, load_shipped
from lipverify.network.extract import extract_layers
from lipverify.network.modules import GroupSort, ResidualBlock
from lipverify.sdp.chain import (
    Chain,
    chain_from_layers,
    power_of_two_scales,
    reduce_input,
    split_chain,
    unsupported_reason,
)


def linear_part(chain, x, phis):
    return chain.forward(x, phis)


def test_cnn_chain_computes_the_network_without_biases():
    model = load_shipped("digits_cnn")
    for m in model.modules():
        if hasattr(m, "bias") and m.bias is not None:
            m.bias.data.zero_()
    chain = chain_from_layers(extract_layers(model, INPUT_SHAPE))
    assert chain.hidden_sizes == (8 * 64, 16 * 16, 32)
    x = torch.rand(5, *INPUT_SHAPE)
    relu = lambda u: np.maximum(u, 0)  # noqa: E731
    ours = chain.forward(x.reshape(5, -1).double().numpy(), (relu,) * 3)
    np.testing.assert_allclose(ours, model(x).double().detach().numpy(), rtol=1e-4, atol=1e-5)


def test_consecutive_affine_maps_get_an_identity_activation():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    chain = chain_from_layers(extract_layers(model, (4,)))
    assert chain.hidden_sizes == (5, 6)
    lo, hi = chain.slopes[0]
    assert np.all(lo == 1) and np.all(hi == 1)
    assert np.allclose(chain.slopes[1][1], 1.0)


def test_refusals_name_the_reason():
    res = nn.Sequential(nn.Linear(4, 4), ResidualBlock(nn.Linear(4, 4), nn.ReLU()),
                        nn.Linear(4, 2))
    assert "residual" in unsupported_reason(extract_layers(res, (4,)))
    gs = nn.Sequential(nn.Linear(4, 4), GroupSort(2), nn.Linear(4, 2))
    assert "groupsort" in unsupported_reason(extract_layers(gs, (4,)))
    affine = nn.Sequential(nn.Linear(4, 2))
    assert "affine" in unsupported_reason(extract_layers(affine, (4,)))


def test_split_chunks_compose_to_the_chain():
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(5, 3)), rng.normal(size=(4, 5)), rng.normal(size=(6, 4))]
    chain = Chain(tuple(ws), tuple((np.zeros(w.shape[0]), np.ones(w.shape[0])) for w in ws),
                  rng.normal(size=(2, 6)))
    parts = split_chain(chain, 2)
    assert [p.depth for p in parts] == [2, 1]
    relu = lambda u: np.maximum(u, 0)  # noqa: E731
    x = rng.normal(size=(7, 3))
    h = parts[0].forward(x, (relu, relu))
    np.testing.assert_allclose(parts[1].forward(h, (relu,)), chain.forward(x, (relu,) * 3))


def test_power_of_two_scaling_is_exact_and_normalises():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 3)) * 37.0
    chain = Chain((w,), ((np.zeros(5), np.ones(5)),), rng.normal(size=(2, 5)) * 1e-3)
    scaled, exps = power_of_two_scales(chain)
    assert np.array_equal(np.ldexp(scaled.weights[0], exps[0]), w)
    for m in (*scaled.weights, scaled.last):
        assert 0.5 <= np.linalg.norm(m, 2) < 1.0


def test_reduce_input_keeps_the_range_of_the_first_weight():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 20))
    chain = Chain((w,), ((np.zeros(4), np.ones(4)),), rng.normal(size=(2, 4)))
    red = reduce_input(chain)
    assert red.input_size == 4
    np.testing.assert_allclose(red.weights[0] @ red.weights[0].T, w @ w.T, rtol=1e-12)
    with pytest.raises(Exception):
        Chain((w,), ((np.zeros(3), np.ones(3)),), rng.normal(size=(2, 4)))
