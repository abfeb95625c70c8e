"""The sparse LMI map against the paper's dense block formula."""

import numpy as np
import pytest
from lipsdp_reference import paper_matrix, random_weights

from lipverify.sdp.assembly import Form, assemble, layer_summation
from lipverify.sdp.chain import Chain


def make_chain(weights, lo, hi):
    sizes = [w.shape[0] for w in weights[:-1]]
    cuts = np.cumsum([0, *sizes])
    slopes = tuple((lo[cuts[i]:cuts[i + 1]], hi[cuts[i]:cuts[i + 1]]) for i in range(len(sizes)))
    return Chain(tuple(weights[:-1]), slopes, weights[-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_neuron_map_equals_paper_matrix_with_per_neuron_slopes(seed):
    rng = np.random.default_rng(seed)
    weights = random_weights([5, 6, 4, 3], rng)
    n = 10
    lo = rng.choice([0.0, 0.1, -0.5, 1.0], size=n)
    hi = lo + rng.choice([0.0, 0.25, 1.0], size=n)
    lmi = assemble(make_chain(weights, lo, hi), Form.NEURON)
    rho, lam = 2.5, rng.uniform(0, 3, size=n)
    t = np.concatenate([[rho], lam])
    np.testing.assert_allclose(lmi.dense(t), paper_matrix(weights, lo, hi, rho, lam),
                               rtol=1e-13, atol=1e-13)
    assert lmi.size == 15


def test_layer_map_is_neuron_map_with_shared_multipliers():
    rng = np.random.default_rng(3)
    weights = random_weights([4, 5, 6, 2], rng)
    lo, hi = np.full(11, 0.1), np.ones(11)
    chain = make_chain(weights, lo, hi)
    layer = assemble(chain, Form.LAYER)
    t_layer = np.array([1.5, 0.7, 2.0])
    lam = np.concatenate([np.full(5, 0.7), np.full(6, 2.0)])
    np.testing.assert_allclose(layer.dense(t_layer), paper_matrix(weights, lo, hi, 1.5, lam),
                               rtol=1e-13, atol=1e-13)
    assert layer_summation(chain).shape == (12, 3)


def test_cvxpy_map_symmetric_part_is_the_matrix():
    rng = np.random.default_rng(4)
    weights = random_weights([3, 4, 2], rng)
    lmi = assemble(make_chain(weights, np.zeros(4), np.ones(4)))
    a, m0 = lmi.cvxpy_map()
    t = rng.uniform(0, 1, size=lmi.num_vars)
    u = (a @ t + m0).reshape(lmi.size, lmi.size, order="F")
    np.testing.assert_allclose((u + u.T) / 2, lmi.dense(t), rtol=1e-14, atol=1e-14)
    assert np.allclose(np.tril(u, -1), 0)  # only the upper triangle is stored
