"""Soundness and tightness of the L2 bound propagation on tiny random ReLU networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lipverify.bounds.chain import build_chain
from lipverify.bounds.intermediate import IntermediateOptions, intermediate_bounds
from lipverify.bounds.operator import block_norms
from lipverify.bounds.optimise import SlopeOptions, optimised_bound
from lipverify.bounds.propagation import propagate
from lipverify.network.extract import extract_layers
from tests.bounds.conftest import ball_samples, tiny_mlp

SEEDS = range(30)


def _setup(seed: int, widths=(2, 12, 12, 3)):
    model = tiny_mlp(seed, widths)
    chain = build_chain(extract_layers(model, (widths[0],)), (widths[0],))
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=widths[0])
    rho = float(rng.uniform(0.05, 1.5)) * np.sqrt(widths[0] / 2)
    k = widths[-1]
    rows = np.stack([np.eye(k)[0] - np.eye(k)[j] for j in range(1, k)])
    return model, chain, x0, rho, rows


def _sampled_min(model, x0, rho, rows):
    pts = torch.as_tensor(ball_samples(x0, rho))
    with torch.no_grad():
        out = model(pts).numpy()
    return (out @ rows.T).min(0)


@pytest.mark.parametrize("couple", [False, True])
@pytest.mark.parametrize("iterations", [0, 5])
def test_bound_below_sampled_minimum(couple, iterations):
    failures = []
    for seed in SEEDS:
        model, chain, x0, rho, rows = _setup(seed)
        norms = block_norms(chain)
        xt = torch.as_tensor(x0[None])
        rt = torch.tensor([rho], dtype=torch.float64)
        relus = intermediate_bounds(chain, norms, xt, rt, IntermediateOptions(couple=couple))
        res = optimised_bound(chain, torch.as_tensor(rows[None]), xt, rt, relus,
                              SlopeOptions(iterations=iterations, couple=couple))
        sampled = _sampled_min(model, x0, rho, rows)
        bound = res.bound[0].numpy()
        if np.any(bound > sampled + 1e-9):
            failures.append((seed, bound.tolist(), sampled.tolist()))
    assert not failures, f"unsound on seeds {[f[0] for f in failures]}: {failures[:3]}"


def test_intermediate_bounds_contain_samples():
    for seed in SEEDS:
        model, chain, x0, rho, _ = _setup(seed, (2, 10, 10, 10, 3))
        norms = block_norms(chain)
        relus = intermediate_bounds(chain, norms, torch.as_tensor(x0[None]),
                                    torch.tensor([rho], dtype=torch.float64))
        pts = torch.as_tensor(ball_samples(x0, rho, grid=61, boundary=1000))
        zs = chain.centres(pts)
        for k, relu in enumerate(relus):
            z = zs[k]
            assert torch.all(z >= relu.lower[0] - 1e-12), f"seed {seed} layer {k} lower"
            assert torch.all(z <= relu.upper[0] + 1e-12), f"seed {seed} layer {k} upper"
            dist = torch.linalg.vector_norm(z - relu.centre[0], dim=1)
            assert torch.all(dist <= relu.radius[0] + 1e-12), f"seed {seed} layer {k} radius"


def test_coupling_never_looser_than_crown():
    """Same intermediate bounds, same slopes: the coupled offset is >= CROWN's (lam = 0)."""
    for seed in SEEDS:
        _, chain, x0, rho, rows = _setup(seed, (2, 16, 16, 16, 4))
        norms = block_norms(chain)
        xt = torch.as_tensor(x0[None])
        rt = torch.tensor([rho], dtype=torch.float64)
        relus = intermediate_bounds(chain, norms, xt, rt)
        r = torch.as_tensor(rows[None])
        plain = propagate(chain, chain.num_relus, r, xt, rt, relus, None, couple=False).bound
        coupled = propagate(chain, chain.num_relus, r, xt, rt, relus, None, couple=True).bound
        assert torch.all(coupled >= plain - 1e-12), f"seed {seed}: {coupled} < {plain}"


def test_coupling_helps_on_wide_layers():
    """On a wider network the coupling term must actually tighten some bound."""
    gains = []
    for seed in range(10):
        _, chain, x0, rho, rows = _setup(seed, (30, 64, 64, 3))
        norms = block_norms(chain)
        xt = torch.as_tensor(x0[None])
        rt = torch.tensor([rho], dtype=torch.float64)
        relus = intermediate_bounds(chain, norms, xt, rt, IntermediateOptions(couple=False))
        r = torch.as_tensor(rows[None])
        plain = propagate(chain, chain.num_relus, r, xt, rt, relus, None, couple=False).bound
        coupled = propagate(chain, chain.num_relus, r, xt, rt, relus, None, couple=True).bound
        gains.append(float((coupled - plain).max()))
    assert max(gains) > 0


@pytest.mark.parametrize("budget", [20, 60, 200])
def test_intermediate_bounds_of_an_input_do_not_depend_on_its_batch(budget):
    """The propagation budget is judged per input: in a batch with wider balls (more unstable
    neurons) an input keeps the bounds it has alone (the budget used to be judged on the
    batch's union, so the cascade, which hands l2prop its hard inputs, lost certificates)."""
    for seed in range(8):
        model, chain, x0, rho, _ = _setup(seed, (2, 10, 10, 10, 3))
        norms = block_norms(chain)
        rng = np.random.default_rng(seed)
        xs = torch.as_tensor(np.stack([x0, *rng.normal(size=(3, 2))]))
        rhos = torch.tensor([rho * 0.3, rho, rho * 3, rho * 6], dtype=torch.float64)
        options = IntermediateOptions(budget=budget)
        together = intermediate_bounds(chain, norms, xs, rhos, options)
        for b in range(len(xs)):
            alone = intermediate_bounds(chain, norms, xs[b:b + 1], rhos[b:b + 1], options)
            for k, (t, a) in enumerate(zip(together, alone, strict=True)):
                for name in ("lower", "upper"):
                    got, want = getattr(t, name)[b], getattr(a, name)[0]
                    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), \
                        f"seed {seed} input {b} layer {k} {name}"
