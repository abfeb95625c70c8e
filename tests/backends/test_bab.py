"""The `bab` backend: splits cover their parent, every verified input is true by an exact MILP,
complete on small nets where CROWN alone is not, leaf LPs, time limits and honest refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.backends._leaf_lp import LeafRegion, leaf_lower_bounds, relu_layers
from lipverify.backends.bab import BabBackend, BabOptions, split, split_constraints
from lipverify.backends.lirpa import LirpaBackend
from lipverify.network.load import load_network
from lipverify.testing import one_torch_thread
from lipverify.types import Norm, Perturbation, Problem, Status

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from milp_reference import min_margin, stages_of  # noqa: E402

CONFIRM = 1e-6


def _mlp(seed, width=12):
    torch.manual_seed(seed)
    l1, l2, l3 = nn.Linear(4, width), nn.Linear(width, width), nn.Linear(width, 3)
    module = nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), l3).eval()
    return module, stages_of([(l1, 0.0), (l2, 0.0), (l3, None)], (4,))


def _robust_by_milp(module, stages, x, label, eps):
    """True when no point of the L-inf box has a float64 margin below -CONFIRM (exact MILP)."""
    double = nn.Sequential(*module).double()
    for other in range(3):
        if other == label:
            continue
        point = min_margin(stages, x - eps, x + eps, label, other)
        with torch.no_grad():
            out = double(torch.as_tensor(point)[None])[0].numpy()
        if out[label] - out[other] < CONFIRM:
            return False
    return True


def test_split_children_cover_the_parent():
    gen = torch.Generator().manual_seed(0)
    lo = -torch.rand(3, 5, generator=gen, dtype=torch.float64)
    up = torch.rand(3, 5, generator=gen, dtype=torch.float64)
    lo2, up2 = lo[:, :4] - 1, up[:, :4] + 1
    choice = torch.tensor([1, 5 + 2, 4])
    children = split([(lo, up), (lo2, up2)], choice)
    for b, flat in enumerate(choice.tolist()):
        layer, at = (0, flat) if flat < 5 else (1, flat - 5)
        (c_lo, c_up) = children[layer]
        p_lo, p_up = [(lo, up), (lo2, up2)][layer]
        # inactive child: upper clamped at 0; active child: lower clamped at 0; rest unchanged
        assert c_up[b, at] == 0 and c_lo[3 + b, at] == 0
        assert c_lo[b, at] == p_lo[b, at] and c_up[3 + b, at] == p_up[b, at]
        mask = torch.ones_like(p_lo[b], dtype=torch.bool)
        mask[at] = False
        for child in (b, 3 + b):
            assert torch.equal(c_lo[child][mask], p_lo[b][mask])
            assert torch.equal(c_up[child][mask], p_up[b][mask])
        other = [(lo, up), (lo2, up2)][1 - layer]  # the other layer is copied for both children
        assert torch.equal(children[1 - layer][0][b], other[0][b])
        assert torch.equal(children[1 - layer][1][3 + b], other[1][b])


@pytest.mark.parametrize(("tighten", "after"), [(0.0, 10.0), (0.4, 0.0), (0.4, 0.02)],
                         ids=["plain", "tightened", "tightened-after-a-plain-search"])
@pytest.mark.parametrize("seed", [1, 4, 5])
def test_verified_exactly_when_the_milp_says_robust(seed, tighten, after):
    """Complete here (every input the MILP proves robust is verified), never wrong, and it
    proves inputs plain CROWN cannot; with or without tightened root bounds, tightened first
    or after a plain search too short for some inputs."""
    module, stages = _mlp(seed)
    net = load_network(module, (4,))
    x = np.random.default_rng(seed).uniform(-1, 1, (8, 4)).astype(np.float32)
    labels = net.forward(x).argmax(1)
    eps = 0.4
    problem = Problem.robustness(x, labels, 3, Perturbation.ball("inf", eps))
    with one_torch_thread():
        bab = BabBackend(BabOptions(time_per_input=20.0, tighten=tighten,
                                    tighten_after=after)).certify(net, problem)
        crown = LirpaBackend().certify(net, problem)
    truth = [_robust_by_milp(module, stages, x[k].astype(np.float64), int(labels[k]), eps)
             for k in range(len(x))]
    got = [c.status == Status.VERIFIED for c in bab]
    assert got == truth
    assert sum(got) > sum(c.status == Status.VERIFIED for c in crown)
    assert all(c.status != Status.FALSIFIED or not t for c, t in zip(bab, truth, strict=True))


def test_split_constraints_name_the_fixed_root_unstable_neurons():
    root = [torch.tensor([[True, True, False, True]])]
    lo = torch.tensor([[0.0, -1.0, 2.0, -1.0], [-1.0, -1.0, 2.0, -1.0]], dtype=torch.float64)
    up = torch.tensor([[1.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 1.0]], dtype=torch.float64)
    ((index, sign),) = split_constraints([(lo, up)], root)
    # domain 0: neuron 0 active (lower 0), neuron 1 inactive (upper 0); neuron 2 was never
    # unstable; domain 1 has none (padding: sign 0)
    assert index.shape == sign.shape == (2, 2)
    assert dict(zip(index[0].tolist(), sign[0].tolist(), strict=True)) == {0: 1.0, 1: -1.0}
    assert sign[1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("seed", [5])
def test_beta_multipliers_shrink_the_search(seed):
    """beta-CROWN's split multipliers prove sub-domains CROWN cannot: the same (exact) answers
    after fewer bounded sub-domains."""
    module, _ = _mlp(seed)
    net = load_network(module, (4,))
    x = np.random.default_rng(seed).uniform(-1, 1, (8, 4)).astype(np.float32)
    labels = net.forward(x).argmax(1)
    problem = Problem.robustness(x, labels, 3, Perturbation.ball("inf", 0.6))
    runs = {}
    with one_torch_thread():
        for lr in (0.0, 0.05):
            runs[lr] = BabBackend(BabOptions(time_per_input=20.0, beta_lr=lr, domains_per_batch=8)
                                  ).certify(net, problem)
    assert [c.status for c in runs[0.0]] == [c.status for c in runs[0.05]]
    domains = {b: sum(c.details.get("domains", 0) for c in certs) for b, certs in runs.items()}
    assert domains[0.05] < domains[0.0]
    assert domains[0.0] > 2 * len(x)  # the roots (two terms each) did not settle it


def test_leaf_lp_is_exact_on_a_linear_piece():
    """All ReLUs fixed by the box: the leaf bound equals the affine map's exact minimum."""
    torch.manual_seed(0)
    l1, l2 = nn.Linear(2, 3), nn.Linear(3, 2)
    with torch.no_grad():
        l1.bias.copy_(torch.tensor([5.0, -5.0, 5.0]))
    net = load_network(nn.Sequential(l1, nn.ReLU(), l2).eval(), (2,))
    layers = relu_layers(net.layers)
    region = LeafRegion(np.array([-0.5, -0.5]), np.array([0.5, 0.5]), np.zeros(2), Norm.LINF,
                        0.5)
    active = [np.array([True, False, True])]
    c, d = np.array([[1.0, -1.0]]), np.array([0.0])
    bounds, _ = leaf_lower_bounds(layers, active, [np.zeros(3, bool)], region, c, d)
    w1, b1 = l1.weight.detach().double().numpy(), l1.bias.detach().double().numpy()
    w2, b2 = l2.weight.detach().double().numpy(), l2.bias.detach().double().numpy()
    mask = active[0].astype(float)
    g = c[0] @ w2 @ (mask[:, None] * w1)
    exact = float(np.minimum(g * -0.5, g * 0.5).sum() + c[0] @ (w2 @ (mask * b1) + b2))
    assert exact - 1e-6 <= bounds[0] <= exact


def test_leaf_lp_shows_an_empty_leaf_empty():
    """Two split half-spaces that exclude each other on the box: the leaf bound is +inf."""
    l1, l2 = nn.Linear(1, 2), nn.Linear(2, 1)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[1.0], [1.0]]))
        l1.bias.copy_(torch.tensor([-0.2, 0.2]))
    net = load_network(nn.Sequential(l1, nn.ReLU(), l2).eval(), (1,))
    region = LeafRegion(np.array([-1.0]), np.array([1.0]), np.zeros(1), Norm.LINF, 1.0)
    # x - 0.2 >= 0 and x + 0.2 <= 0 cannot both hold
    bounds, _ = leaf_lower_bounds(relu_layers(net.layers), [np.array([True, False])],
                                  [np.array([True, True])], region, np.array([[1.0]]),
                                  np.array([0.0]))
    assert bounds[0] == np.inf


def test_time_limit_gives_timeout_not_a_guess():
    module, _ = _mlp(4)
    net = load_network(module, (4,))
    x = np.random.default_rng(4).uniform(-1, 1, (4, 4)).astype(np.float32)
    labels = net.forward(x).argmax(1)
    problem = Problem.robustness(x, labels, 3, Perturbation.ball("inf", 0.8))
    with one_torch_thread():
        certs = BabBackend(BabOptions(time_per_input=0.05)).certify(net, problem)
    assert {c.status for c in certs} <= {Status.VERIFIED, Status.TIMEOUT, Status.FALSIFIED}
    assert any(c.status == Status.TIMEOUT for c in certs)


def test_declines_non_relu_activations():
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
    net = load_network(module, (4,))
    problem = Problem.robustness(np.zeros((1, 4), np.float32), np.array([0]), 3,
                                 Perturbation.ball("inf", 0.1))
    why = BabBackend().supports(net, problem)
    assert why and "ReLU" in why and "\n" not in why
