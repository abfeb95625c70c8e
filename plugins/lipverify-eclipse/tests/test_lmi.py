"""The proven ECLipsE chain against independent evidence.

- eclipse-nn's own ECLipsE-Fast value (the re-derived closed form gives the same number, proven);
- lipverify's LipSDP check: the staged proof implies LipSDP's matrix inequality with
  multipliers `rho * lambda / 2`, which `lipverify.sdp.check` proves independently;
- exact Lipschitz constants of 2-input ReLU nets and sampled Jacobian norms.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lipverify.network.extract import extract_layers
from lipverify.sdp import chain_from_layers
from lipverify.sdp.assembly import assemble
from lipverify.sdp.check import certify_multipliers
from lipverify.testing import exact_lipschitz_2d, jacobian_lower_bound
from lipverify.types import Norm
from torch import nn

from lipverify_eclipse.lmi import (
    CertificateError,
    Slopes,
    min_eigenvalue,
    prove_chain,
    prove_stage,
    psd_margin,
)
from lipverify_eclipse.multipliers import fast_multipliers


def random_mlp(sizes, seed, act=nn.ReLU):
    gen = torch.Generator().manual_seed(seed)
    mods = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / math.sqrt(sizes[i]))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.3)
        mods += [lin, act()]
    return nn.Sequential(*mods[:-1]).eval()


def fast_certificate(module, shape):
    chain = chain_from_layers(extract_layers(module, shape))
    slopes = [Slopes.of(lo, hi) for lo, hi in chain.slopes]

    def choose(i, y):
        yield fast_multipliers(y, chain.weights[i], slopes[i]), "fast"

    return chain, prove_chain(chain.weights, slopes, chain.last, choose)


@pytest.mark.parametrize("sizes", [(5, 8, 3), (6, 16, 12, 4), (20, 32, 32, 32, 10)])
def test_fast_matches_eclipse_nn_and_is_proven(sizes):
    from eclipse_nn import ECLipsE_Fast

    module = random_mlp(sizes, seed=len(sizes))
    chain, cert = fast_certificate(module, (sizes[0],))
    ours = cert.bound()
    weights = [torch.as_tensor(w) for w in (*chain.weights, chain.last)]
    theirs = float(ECLipsE_Fast(weights, [0.0] * chain.depth, [1.0] * chain.depth))
    assert ours >= theirs * (1 - 1e-9)
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_stage_proof_implies_the_lipsdp_inequality(seed):
    module = random_mlp((4, 10, 8, 3), seed)
    chain, cert = fast_certificate(module, (4,))
    rho = cert.bound() ** 2
    lambdas = np.concatenate([rho * lam / 2 for lam in cert.lambdas])
    checked = certify_multipliers(assemble(chain), lambdas, rho)
    assert checked.rho <= rho * (1 + 1e-6)
    assert checked.max_eig <= -checked.margin


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_is_above_the_exact_constant(seed):
    module = random_mlp((2, 8, 8, 2), seed)
    _, cert = fast_certificate(module, (2,))
    assert cert.bound() >= exact_lipschitz_2d(module, Norm.L2)
    for row in ([1.0, -1.0], [0.0, 1.0]):
        margin = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            margin.weight.copy_(torch.tensor([row]))
        exact_row = exact_lipschitz_2d(nn.Sequential(*module, margin), Norm.L2)
        assert cert.row_bound(np.array(row)) >= exact_row


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid])
def test_smooth_activations_above_sampled_jacobians(act):
    module = random_mlp((6, 12, 12, 3), 4, act)
    _, cert = fast_certificate(module, (6,))
    assert cert.bound() >= jacobian_lower_bound(module, (6,), Norm.L2, samples=512)


def test_bad_multipliers_are_refused():
    module = random_mlp((3, 5, 2), 0)
    chain = chain_from_layers(extract_layers(module, (3,)))
    s = Slopes.of(*chain.slopes[0])
    y = np.eye(3)
    big = fast_multipliers(y, chain.weights[0], s) * 1e3  # makes X_1 indefinite
    with pytest.raises(CertificateError, match="indefinite"):
        prove_stage(y, chain.weights[0], big, s, "test")

    def choose(i, y):
        yield big, "too large"
        yield fast_multipliers(y, chain.weights[0], s), "fast"

    cert = prove_chain(chain.weights, [s], chain.last, choose)  # falls back to the closed form
    assert [c.multipliers for c in cert.stages] == ["fast"]
    with pytest.raises(CertificateError, match="all zero"):
        prove_stage(y, chain.weights[0], np.zeros(5), s, "test")
    with pytest.raises(CertificateError, match="slopes >= 0"):
        Slopes.of(np.array([-0.1]), np.array([1.0]))


def test_a_barely_indefinite_matrix_is_not_proven():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(50, 50)))
    eig = np.linspace(1.0, 2.0, 50)
    eig[0] = -1e-13
    m = (q * eig) @ q.T
    m = (m + m.T) / 2
    assert min_eigenvalue(m) < psd_margin(m, np.abs(m), 51)
