"""lipsdp_bound against the paper's plain cvxpy formulation, sampled Jacobians and products."""

import math

import numpy as np
import pytest
import torch
from lipsdp_reference import (
    paper_matrix,
    plain_lipsdp,
    product_bound,
    random_weights,
    sampled_jacobian_norm,
)

from lipverify.errors import ResourceError
from lipverify.models import load_shipped
from lipverify.sdp import Form, SDPOptions, Solver, Verdict, lipsdp_bound

REL_AGREE = 1e-3


def relu_slopes(weights):
    return [(np.zeros(w.shape[0]), np.ones(w.shape[0])) for w in weights[:-1]]


def shipped_mlp_weights():
    model = load_shipped("digits_mlp")
    return [m.weight.detach().double().numpy() for m in model if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("seed,dims", [(0, [6, 8, 5, 3]), (1, [12, 10, 2]), (2, [5, 7, 6, 4, 2])])
@pytest.mark.parametrize("solver", [Solver.IPM, Solver.SCS])
def test_agrees_with_plain_formulation_on_random_nets(seed, dims, solver):
    rng = np.random.default_rng(seed)
    weights = random_weights(dims, rng, gain=2.0)
    slopes = relu_slopes(weights)
    bound = lipsdp_bound(weights, slopes, SDPOptions(solver=solver))
    lo = np.concatenate([s[0] for s in slopes])
    hi = np.concatenate([s[1] for s in slopes])
    plain = plain_lipsdp(weights, lo, hi)
    assert bound.value == pytest.approx(plain, rel=REL_AGREE)
    assert bound.value >= sampled_jacobian_norm(weights, rng) * (1 - 1e-12)
    assert bound.value <= product_bound(weights) * (1 + 1e-9)
    assert bound.verdict in (Verdict.USE, Verdict.USE_AFTER_CHECK)


def test_layer_form_and_leaky_slopes_agree_with_plain():
    rng = np.random.default_rng(3)
    weights = random_weights([7, 9, 6, 3], rng, gain=1.5)
    slopes = [(np.full(w.shape[0], 0.1), np.ones(w.shape[0])) for w in weights[:-1]]
    lo = np.full(15, 0.1)
    hi = np.ones(15)
    neuron = lipsdp_bound(weights, slopes)
    layer = lipsdp_bound(weights, slopes, SDPOptions(form=Form.LAYER))
    assert neuron.value == pytest.approx(plain_lipsdp(weights, lo, hi), rel=REL_AGREE)
    assert layer.value == pytest.approx(plain_lipsdp(weights, lo, hi, layer=True), rel=REL_AGREE)
    assert neuron.value <= layer.value * (1 + 1e-6)
    assert neuron.value >= sampled_jacobian_norm(weights, rng, neg_slope=0.1) * (1 - 1e-12)


def test_shipped_mlp_bound_lies_between_evidence():
    weights = shipped_mlp_weights()
    rng = np.random.default_rng(0)
    bound = lipsdp_bound(weights, relu_slopes(weights))
    assert sampled_jacobian_norm(weights, rng, samples=500) <= bound.value
    assert bound.value <= product_bound(weights)


@pytest.mark.slow  # ~1.5 min of SCS on the plain formulation; benchmarks/bench_lipsdp.py too
def test_shipped_mlp_agrees_with_plain_formulation():
    weights = shipped_mlp_weights()
    bound = lipsdp_bound(weights, relu_slopes(weights))
    # the plain problem on power-of-two rescaled weights (exact; SCS converges far faster)
    scales = [2.0 ** np.ceil(np.log2(np.linalg.norm(w, 2))) for w in weights]
    plain = plain_lipsdp([w / s for w, s in zip(weights, scales, strict=True)], np.zeros(96),
                         np.ones(96), eps=1e-5) * float(np.prod(scales))
    assert bound.value == pytest.approx(plain, rel=REL_AGREE)


def test_matrix_inequality_holds_at_returned_bound():
    rng = np.random.default_rng(4)
    weights = random_weights([30, 12, 10, 4], rng, gain=3.0)  # n0 > n1: input reduction used
    slopes = relu_slopes(weights)
    bound = lipsdp_bound(weights, slopes)
    assert bound.solved_size < bound.full_size
    lo, hi = np.zeros(22), np.ones(22)
    assert bound.rho <= bound.value ** 2
    m = paper_matrix(weights, lo, hi, bound.value ** 2, bound.multipliers[1:])
    assert np.all(bound.multipliers >= 0)
    assert np.linalg.eigvalsh(m)[-1] <= 0.0
    # and the certified rho is not far above the optimum: with rho 0.1 % lower it fails
    m_low = paper_matrix(weights, lo, hi, bound.rho * 0.998, bound.multipliers[1:])
    assert np.linalg.eigvalsh(m_low)[-1] > 0.0


def test_input_reduction_keeps_the_optimum():
    rng = np.random.default_rng(5)
    weights = random_weights([40, 8, 6, 3], rng)
    slopes = relu_slopes(weights)
    reduced = lipsdp_bound(weights, slopes, SDPOptions(reduce_input=True))
    full = lipsdp_bound(weights, slopes, SDPOptions(reduce_input=False))
    assert reduced.solved_size == 8 + 14
    assert full.solved_size == 40 + 14
    assert reduced.value == pytest.approx(full.value, rel=1e-6)


def test_fixed_slopes_give_the_exact_norm_of_the_linear_map():
    # Every neuron fixed: [0, 0] (inactive) or [1, 1] (active): the net is the linear map
    # W_2 D_2 W_1 D_1 W_0, whose Lipschitz constant is its spectral norm; LipSDP is exact here.
    rng = np.random.default_rng(6)
    weights = random_weights([6, 8, 7, 3], rng)
    masks = [rng.integers(0, 2, size=w.shape[0]).astype(float) for w in weights[:-1]]
    slopes = [(m, m) for m in masks]
    bound = lipsdp_bound(weights, slopes)
    linear = weights[2] @ np.diag(masks[1]) @ weights[1] @ np.diag(masks[0]) @ weights[0]
    exact = np.linalg.norm(linear, 2)
    # Inactive neurons are removed exactly; active ones ([1, 1]) need unbounded multipliers,
    # which the solver approaches: the bound is sound and within 1e-3 of the exact norm.
    assert exact <= bound.value <= exact * (1 + 1e-3)
    assert np.all(np.isnan(bound.multipliers[1:][np.concatenate(masks) == 0]))
    # Masking is never looser than the unmasked [0, 1] network
    assert bound.value <= lipsdp_bound(weights, relu_slopes(weights)).value * (1 + 1e-9)
    # A whole inactive layer makes the network constant
    dead = [(np.zeros(8), np.zeros(8)), (np.ones(7), np.ones(7))]
    assert lipsdp_bound(weights, dead).value == 0.0


def test_split_is_a_product_of_chunk_bounds_between_one_sdp_and_the_product():
    rng = np.random.default_rng(7)
    weights = random_weights([6, 8, 8, 8, 3], rng)
    slopes = relu_slopes(weights)
    whole = lipsdp_bound(weights, slopes)
    split = lipsdp_bound(weights, slopes, split=1)
    assert split.chunks == 3
    assert whole.value * (1 - 1e-9) <= split.value <= product_bound(weights) * (1 + 1e-9)


def test_memory_budget_refuses_with_the_estimate():
    rng = np.random.default_rng(8)
    weights = random_weights([20, 30, 30, 3], rng)
    with pytest.raises(ResourceError, match=r"about [0-9.]+ GiB.*budget is 0\.00 GiB"):
        lipsdp_bound(weights, relu_slopes(weights), SDPOptions(memory_budget_gb=1e-6))
    with pytest.raises(ResourceError, match="GiB"):
        lipsdp_bound(weights, relu_slopes(weights),
                     SDPOptions(solver=Solver.CLARABEL, memory_budget_gb=0.05))


def test_clarabel_small_net_agrees():
    rng = np.random.default_rng(9)
    weights = random_weights([4, 5, 4, 2], rng)
    a = lipsdp_bound(weights, relu_slopes(weights), SDPOptions(solver=Solver.CLARABEL))
    b = lipsdp_bound(weights, relu_slopes(weights))
    assert a.value == pytest.approx(b.value, rel=REL_AGREE)
    assert math.isfinite(a.raw_objective)
