"""Counterexamples to distance preservation on maps whose lower constant is known exactly."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.lower_bounds import LowerBoundOptions
from lipverify.lower_lipschitz_search import search_lower_counterexample
from lipverify.network.load import load_network
from lipverify.network.modules import ResidualBlock

QUICK = LowerBoundOptions(random_points=24, ascent_steps=15)


def _linear_residual(n=4, seed=0, scale=0.7):
    torch.manual_seed(seed)
    model = nn.Sequential(ResidualBlock(nn.Linear(n, n)))
    with torch.no_grad():
        w = model[0].body[0].weight
        w.mul_(scale / np.linalg.norm(w.numpy(), 2))
    a = model[0].body[0].weight.detach().double().numpy()
    return load_network(model), np.linalg.svd(np.eye(n) + a, compute_uv=False).min()


def test_claim_above_the_true_constant_is_refuted_with_a_pair():
    net, sigma = _linear_residual()
    found = search_lower_counterexample(net, claim=1.05 * sigma, seed=0, options=QUICK)
    assert found.violates and found.proven
    assert sigma * (1 - 1e-9) <= found.ratio <= found.ratio_upper < 1.05 * sigma
    assert found.x.shape == (4,) and found.distance > 0
    # the pair checked independently: f(x) = (I + A) x + b in float64
    a = net.module[0].body[0].weight.detach().double().numpy()
    diff = (np.eye(4) + a) @ (found.x - found.x_prime)
    assert np.linalg.norm(diff) / np.linalg.norm(found.x - found.x_prime) < 1.05 * sigma


def test_claim_below_the_true_constant_is_not_refuted():
    net, sigma = _linear_residual(seed=3)
    found = search_lower_counterexample(net, claim=0.95 * sigma, seed=1, options=QUICK)
    assert not found.violates
    assert found.ratio >= sigma * (1 - 1e-9)
    no_claim = search_lower_counterexample(net, seed=1, options=QUICK)
    assert not no_claim.violates and no_claim.claim is None


def test_non_injective_maps_give_ratio_near_zero():
    torch.manual_seed(2)
    relu = load_network(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    # ReLU zeroes a half-space: two points there map to the same output
    assert search_lower_counterexample(relu, claim=1e-3, seed=0, options=QUICK).violates
    wide = load_network(nn.Sequential(nn.Linear(5, 2)))
    assert search_lower_counterexample(wide, seed=0, options=QUICK).ratio < 1e-8


def test_seeded_and_json():
    net, _ = _linear_residual(seed=4)
    one = search_lower_counterexample(net, claim=2.0, seed=7, options=QUICK)
    two = search_lower_counterexample(net, claim=2.0, seed=7, options=QUICK)
    assert one.ratio == two.ratio and np.array_equal(one.x, two.x)
    data = json.loads(json.dumps(one.to_json()))
    assert data["violates"] is True and len(data["x"]) == 4
    assert data["ratio"] == pytest.approx(one.ratio)
