"""Independent references for the LipSDP tests: the paper's formulation written out plainly.

Nothing here imports lipverify.sdp: the matrix is built from the block matrices of Fazlyab et
al. (2019), Theorem 2, `M = [A; B]^T Q [A; B] + blkdiag(-rho I, 0, ..., W_L^T W_L)`.
"""

import cvxpy as cp
import numpy as np


def random_weights(dims, rng, gain=1.0):
    return [gain * rng.normal(0, 1 / np.sqrt(dims[i]), (dims[i + 1], dims[i]))
            for i in range(len(dims) - 1)]


def _blocks(weights):
    hidden = [w.shape[0] for w in weights[:-1]]
    n0, n = weights[0].shape[1], sum(hidden)
    a = np.zeros((n, n0 + n))
    row, col = 0, 0
    for w in weights[:-1]:
        a[row:row + w.shape[0], col:col + w.shape[1]] = w
        row += w.shape[0]
        col += w.shape[1]
    b = np.hstack([np.zeros((n, n0)), np.eye(n)])
    e_last = np.zeros((n0 + n, n0 + n))
    last = weights[-1]
    e_last[-hidden[-1]:, -hidden[-1]:] = last.T @ last
    return a, b, e_last, n0, n


def paper_matrix(weights, lo, hi, rho, lam):
    """The LipSDP-Neuron matrix as a dense NumPy array (per-neuron slopes `lo`, `hi`)."""
    a, b, e_last, n0, n = _blocks(weights)
    t = np.diag(lam)
    q11 = -2 * np.diag(lo * hi) @ t
    q12 = np.diag(lo + hi) @ t
    q = np.block([[q11, q12], [q12, -2 * t]])
    ab = np.vstack([a, b])
    m = ab.T @ q @ ab + e_last
    m[:n0, :n0] -= rho * np.eye(n0)
    return m


def plain_lipsdp(weights, lo, hi, layer=False, solver="SCS", eps=1e-8):
    """LipSDP-Neuron (or -Layer) exactly as in the paper: dense cp.Variable, `M << 0`."""
    a, b, e_last, n0, n = _blocks(weights)
    rho = cp.Variable(nonneg=True)
    if layer:
        sizes = [w.shape[0] for w in weights[:-1]]
        mu = cp.Variable(len(sizes), nonneg=True)
        lam = cp.hstack([mu[i] * np.ones(s) for i, s in enumerate(sizes)])
    else:
        lam = cp.Variable(n, nonneg=True)
    # M = sum_i lambda_i [A; B]^T Q_i [A; B] + E_last - rho E_0, with Q_i the paper's Q for
    # T = e_i e_i^T (dense NumPy constants: cvxpy canonicalises a sum of scalar multiples fast).
    ab = np.vstack([a, b])
    terms = []
    for i in range(n):
        e = np.zeros(n)
        e[i] = 1.0
        qi = np.block([[-2 * np.diag(lo * hi * e), np.diag((lo + hi) * e)],
                       [np.diag((lo + hi) * e), -2 * np.diag(e)]])
        terms.append(lam[i] * (ab.T @ qi @ ab))
    e0 = np.zeros((n0 + n, n0 + n))
    e0[:n0, :n0] = np.eye(n0)
    m = cp.sum(terms) + e_last - rho * e0
    prob = cp.Problem(cp.Minimize(rho), [(m + m.T) / 2 << 0])
    kwargs = {"eps_abs": eps, "eps_rel": eps, "max_iters": 200000} if solver == "SCS" else {}
    prob.solve(solver=solver, **kwargs)
    assert prob.status == "optimal", prob.status
    return float(np.sqrt(rho.value))


def sampled_jacobian_norm(weights, rng, neg_slope=0.0, samples=2000):
    """Largest ||J(x)||_2 over random inputs of a (leaky) ReLU net: a lower bound of L."""
    best = 0.0
    n0 = weights[0].shape[1]
    for _ in range(samples):
        h = rng.normal(size=n0) * rng.uniform(0.1, 3)
        j = np.eye(n0)
        for w in weights[:-1]:
            u = w @ h
            d = np.where(u > 0, 1.0, neg_slope)
            j = d[:, None] * (w @ j)
            h = d * u
        best = max(best, float(np.linalg.norm(weights[-1] @ j, 2)))
    return best


def product_bound(weights):
    return float(np.prod([np.linalg.norm(w, 2) for w in weights]))
