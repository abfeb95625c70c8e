"""`lipverify.bab`: bounds below every sampled value of their sub-domain, root bounds contain
every sampled pre-activation, and the rounding allowance covers the float32-vs-float64 gap."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from lipverify.bab.optimise import Steps, optimise
from lipverify.bab.relaxed import (
    InputSet,
    abs_chain,
    backward_bound,
    cast_chain,
    initial_slopes,
    rounding_factor,
    split_bounds,
)
from lipverify.bab.root import root_bounds
from lipverify.bounds.chain import build_chain
from lipverify.network.load import load_network


def _net(seed: int, widths=(5, 16, 16, 12, 3)):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    module = nn.Sequential(*layers).eval()
    net = load_network(module, (widths[0],))
    # float32 weights are exact in float64: the reference runs the same function
    return copy.deepcopy(module).double(), build_chain(net.require_layers(), net.input_shape)


def _pre_activations(module: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    out, h = [], x
    for layer in module:
        h = layer(h)
        if isinstance(layer, nn.Linear):
            out.append(h)
    return out


def _samples(inputs: InputSet, count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = len(inputs.centre)
    if inputs.half is not None:
        u = torch.rand(count, n, generator=gen, dtype=torch.float64) * 2 - 1
        corners = torch.sign(torch.randn(count // 4, n, generator=gen, dtype=torch.float64))
        return inputs.centre + torch.cat([u, corners]) * inputs.half
    v = torch.randn(count, n, generator=gen, dtype=torch.float64)
    r = torch.rand(count, 1, generator=gen, dtype=torch.float64) ** (1 / n)
    return inputs.centre + inputs.radius * r * v / v.norm(dim=1, keepdim=True)


def _region(kind: str, seed: int) -> InputSet:
    centre = torch.as_tensor(np.random.default_rng(seed).uniform(-1, 1, 5))
    if kind == "box":
        return InputSet.box(centre - 0.6, centre + 0.4)
    return InputSet.ball(centre, 0.8)


@pytest.mark.parametrize("kind", ["box", "ball"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_root_bounds_contain_every_sampled_pre_activation(kind, seed):
    module, chain = _net(seed)
    inputs = _region(kind, seed)
    bounds = root_bounds(chain, inputs, Steps(iterations=15))
    crown = root_bounds(chain, inputs, Steps(iterations=0))
    x = _samples(inputs, 4000, seed)
    with torch.no_grad():
        pre = _pre_activations(module, x)
    for (lo, up), (c_lo, c_up), z in zip(bounds, crown, pre, strict=False):
        assert (z >= lo - 1e-12).all() and (z <= up + 1e-12).all()
        assert (lo >= c_lo).all() and (up <= c_up).all()  # optimising only tightens
    gain = sum(float((c_up - c_lo).sum() - (up - lo).sum()) for (lo, up), (c_lo, c_up)
               in zip(bounds, crown, strict=True))
    assert gain > 0


@pytest.mark.parametrize("kind", ["box", "ball"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_bounds_hold_on_every_sampled_point_of_the_sub_domain(kind, seed):
    """Random splits, slopes, upper-line weights and multipliers (any values are valid): on
    every sample point satisfying the splits, each row's value is at least the bound, with the
    split neurons' bounds clamped at 0 or with their root relaxation blended by `tau`."""
    module, chain = _net(seed)
    inputs = _region(kind, seed)
    root = root_bounds(chain, inputs, Steps(iterations=0))
    gen = torch.Generator().manual_seed(seed)
    batch, rows = 6, 2
    seeds = _samples(inputs, batch, seed + 100)[:batch]  # each sub-domain holds one of these points
    with torch.no_grad():
        seed_pre = _pre_activations(module, seeds)
    splits = []
    for (lo, up), z in zip(root, seed_pre, strict=False):
        unstable = (lo < 0) & (up > 0)
        pick = (torch.rand(batch, len(lo), generator=gen) < 0.3) & unstable
        splits.append((pick * torch.where(z >= 0, 1, -1)).to(torch.int8))
    bounds = split_bounds(root, splits)
    alpha = [torch.rand(batch, rows, len(lo), generator=gen, dtype=torch.float64) * 1.4 - 0.2
             for lo, _ in root]  # some outside [0, 1]: clamped inside
    beta = [torch.rand(batch, rows, len(lo), generator=gen, dtype=torch.float64) * 2
            for lo, _ in root]
    c = torch.randn(batch, rows, 3, generator=gen, dtype=torch.float64)
    d = torch.randn(batch, rows, generator=gen, dtype=torch.float64)
    clamped, _, _ = backward_bound(chain, bounds, splits, alpha, beta, c, d, inputs)
    tau = [torch.rand(batch, rows, len(lo), generator=gen, dtype=torch.float64) * 1.4 - 0.2
           for lo, _ in root]
    blended, _, _ = backward_bound(chain, [(lo[None], up[None]) for lo, up in root], splits,
                                   alpha, beta, c, d, inputs, tau=tau)
    x = _samples(inputs, 20000, seed)
    with torch.no_grad():
        pre = _pre_activations(module, x)
        out = pre[-1]
    checked = 0
    for b in range(batch):
        ok = torch.ones(len(x), dtype=torch.bool)
        for s, z in zip(splits, pre, strict=False):
            ok &= ((s[b] > 0) & (z < 0)).sum(dim=1) == 0
            ok &= ((s[b] < 0) & (z > 0)).sum(dim=1) == 0
        if ok.any():
            rows_at = out[ok] @ c[b].T - d[b]
            for value in (clamped, blended):
                assert (rows_at.min(dim=0).values >= value[b] - 1e-9).all()
            checked += 1
    assert checked == batch


@pytest.mark.parametrize("seed", [0, 1])
def test_rounding_allowance_covers_the_float32_bound(seed):
    """The allowance, at float32's unit roundoff, covers the distance between the bound
    computed in float32 and in float64 (rounding the float64 one makes is 2**29 times less)."""
    _, chain = _net(seed, (5, 64, 64, 64, 3))
    inputs = _region("box", seed)
    root = root_bounds(chain, inputs, Steps(iterations=0))
    bounds = [(lo[None], up[None]) for lo, up in root]
    alpha = initial_slopes(bounds, 3)
    c = torch.eye(3, dtype=torch.float64)[None] * 3 - 1
    d = torch.zeros(1, 3, dtype=torch.float64)
    exact, _, size = backward_bound(chain, bounds, None, alpha, None, c, d, inputs,
                                    magnitudes=abs_chain(chain))
    fast = cast_chain(chain, torch.float32, "cpu")
    low, _, _ = backward_bound(fast, [(lo.float(), up.float()) for lo, up in bounds], None,
                               [a.float() for a in alpha], None, c.float(), d.float(),
                               inputs.to(torch.float32, "cpu"))
    gap = (low.double() - exact).abs()
    allowance = rounding_factor(chain, 2.0**-24) * size
    assert (gap <= allowance).all()
    assert (rounding_factor(chain) * size < 1e-9).all()


def test_optimised_bound_is_never_below_the_start():
    _, chain = _net(4)
    inputs = _region("box", 4)
    root = [(lo[None], up[None]) for lo, up in root_bounds(chain, inputs, Steps(iterations=0))]
    c = -torch.eye(3, dtype=torch.float64)[None]
    d = torch.full((1, 3), -5.0, dtype=torch.float64)

    def bound(alpha, beta):
        return backward_bound(chain, root, None, alpha, None, c, d, inputs)

    start, _, _ = bound(initial_slopes(root, 3), None)
    best = optimise(bound, initial_slopes(root, 3), None, Steps(iterations=30))
    assert (best.value >= start).all() and (best.value > start + 1e-6).any()
    again, _, _ = bound(best.alpha, None)
    assert torch.allclose(again, best.value)


def test_a_split_with_tau_zero_keeps_the_parents_bound():
    """With `tau` = 0 and the new split's multiplier 0, the child's bound is the parent's."""
    _, chain = _net(5)
    inputs = _region("box", 5)
    root = [(lo[None], up[None]) for lo, up in root_bounds(chain, inputs, Steps(iterations=0))]
    c = -torch.eye(3, dtype=torch.float64)[None]
    d = torch.full((1, 3), -5.0, dtype=torch.float64)
    alpha = initial_slopes(root, 3)
    zeros = [torch.zeros_like(a) for a in alpha]
    parent, _, _ = backward_bound(chain, root, None, alpha, None, c, d, inputs)
    k = 1
    j = int(torch.nonzero((root[k][0][0] < 0) & (root[k][1][0] > 0))[0])
    for sign in (-1, 1):
        splits = [torch.zeros_like(lo, dtype=torch.int8) for lo, _ in root]
        splits[k][0, j] = sign
        child, _, _ = backward_bound(chain, root, splits, alpha, zeros, c, d, inputs, tau=zeros)
        assert torch.allclose(child, parent)
