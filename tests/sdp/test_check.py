"""The post-solver check: any multipliers become a proven rho, or a typed error."""

import numpy as np
import pytest
from lipsdp_reference import paper_matrix, random_weights

from lipverify.sdp.assembly import Form, assemble
from lipverify.sdp.chain import Chain
from lipverify.sdp.check import CertificationError, certify_multipliers
from lipverify.sdp.solve import Solver, solve_chain


def relu_chain(weights):
    return Chain(tuple(weights[:-1]), tuple((np.zeros(w.shape[0]), np.ones(w.shape[0]))
                                            for w in weights[:-1]), weights[-1])


def test_inaccurate_multipliers_are_repaired_and_hold_independently():
    rng = np.random.default_rng(0)
    weights = random_weights([6, 7, 5, 3], rng)
    chain = relu_chain(weights)
    raw = solve_chain(chain, Form.NEURON, Solver.IPM, 1e-8)
    noisy = raw.t[1:] * rng.uniform(0.9, 1.1, size=raw.t.size - 1)  # a sloppy solver
    result = certify_multipliers(assemble(chain), noisy, raw.t[0])
    assert result.max_eig <= -result.margin < 0
    m = paper_matrix(weights, np.zeros(12), np.ones(12), result.rho, result.lambdas)
    assert np.linalg.eigvalsh(m)[-1] <= 0
    # Schur repair: the rho these multipliers need, not the solver's (wrong) rho
    assert result.rho >= raw.t[0] * (1 - 1e-9)
    tight = certify_multipliers(assemble(chain), raw.t[1:], raw.t[0])
    assert tight.rho == pytest.approx(raw.t[0], rel=1e-6)


def test_negative_multipliers_are_clipped():
    # Neuron 0 has no outgoing weights, so its multiplier may be 0; a solver's -1e-3 there
    # would flip its quadratic constraint and must be clipped.
    rng = np.random.default_rng(1)
    weights = random_weights([4, 5, 2], rng)
    weights[1][:, 0] = 0.0
    chain = relu_chain(weights)
    raw = solve_chain(chain, Form.NEURON, Solver.IPM, 1e-8)
    lam = raw.t[1:].copy()
    lam[0] = -1e-3
    result = certify_multipliers(assemble(chain), lam, raw.t[0])
    assert np.all(result.lambdas > 0)
    assert result.rho == pytest.approx(raw.t[0], rel=1e-5)


def test_multipliers_with_indefinite_hidden_block_are_refused():
    rng = np.random.default_rng(2)
    weights = random_weights([4, 5, 2], rng)
    chain = relu_chain(weights)
    with pytest.raises(CertificationError, match="hidden block"):
        certify_multipliers(assemble(chain), np.zeros(5), 1.0)
    lam = np.full(5, 1e-3)  # far too small for the output layer: no repair helps
    with pytest.raises(CertificationError, match="hidden block"):
        certify_multipliers(assemble(chain), lam, 1.0)
