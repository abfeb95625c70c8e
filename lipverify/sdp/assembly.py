"""The LipSDP matrix inequality as one sparse linear map from the multipliers to the matrix.

Variables `t = (rho, lambda)`; the LipSDP matrix is `M(t) = M0 + sum_k t_k A_k`, on the stacked
vector `z = (x, v_1, ..., v_L)` of the input and the hidden activations. Each hidden neuron `i`
of layer `l` (pre-activation `u = w_i . v_{l-1}`, slopes `[a, b]`) contributes the quadratic
constraint `lambda * (v_i - a u)(b u - v_i) >= 0`, i.e. `lambda` times

    -2ab u^2 + 2(a+b) u v_i - 2 v_i^2        (the paper's scaling, T = diag(lambda)),

and `M0 = E_L^T last^T last E_L`, `-rho I` on the input block. `M(t) <= 0` with all
`lambda >= 0` proves `||last (v_L - v_L')|| <= sqrt(rho) ||x - x'||` for every activation
whose difference quotients lie in `[a, b]` (Fazlyab et al. 2019, Theorem 2, per neuron).

LipSDP-Layer shares one multiplier per layer: its map is the neuron map times a 0/1 matrix
summing each layer's columns. Only the upper triangle is stored (`row <= col`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from lipverify.sdp.chain import Chain


class Form(enum.Enum):
    """Which multipliers LipSDP uses."""

    NEURON = "neuron"
    LAYER = "layer"


@dataclass(frozen=True, eq=False)
class LMI:
    """`M(t) = M0 + A t` on the upper triangle, `M` of size `size`.

    `coeffs` has one row per stored upper-triangle entry (`rows[k] <= cols[k]`) and one column
    per variable; `const` holds `M0` on the same entries. `blocks` are the offsets of the input
    and hidden blocks (and the total size last); `const_terms` is the number of summands in an
    entry of `M0` (the number of output rows), for rounding-error bounds.
    """

    size: int
    rows: np.ndarray
    cols: np.ndarray
    coeffs: sp.csr_array
    const: np.ndarray
    blocks: tuple[int, ...]
    form: Form
    const_terms: int = 1

    @property
    def num_vars(self) -> int:
        """Number of variables (rho first)."""
        return int(self.coeffs.shape[1])

    @property
    def input_size(self) -> int:
        """Size of the input block."""
        return self.blocks[1]

    def dense(self, t: np.ndarray) -> np.ndarray:
        """The symmetric matrix `M(t)` (float64)."""
        return self._fill(self.coeffs @ np.asarray(t, np.float64) + self.const)

    def linear(self, v: np.ndarray) -> np.ndarray:
        """The linear part `sum_k v_k A_k` (no `M0`), dense."""
        return self._fill(self.coeffs @ np.asarray(v, np.float64))

    def dense_abs(self, t: np.ndarray) -> np.ndarray:
        """`|M0| + |A| |t|` entrywise: the scale of every entry's rounding error."""
        return self._fill(abs(self.coeffs) @ np.abs(np.asarray(t, np.float64))
                          + np.abs(self.const))

    def _fill(self, values: np.ndarray) -> np.ndarray:
        m = np.zeros((self.size, self.size))
        m[self.rows, self.cols] = values
        m[self.cols, self.rows] = values
        return m

    def cvxpy_map(self) -> tuple[sp.csc_array, np.ndarray]:
        """The map for cvxpy: `(A, m0)` with `A t + m0 = vec(U)`, column-major.

        `U` is the upper triangle with doubled off-diagonal entries, whose symmetric part
        `(U + U^T) / 2` is `M(t)`: what a cvxpy PSD constraint constrains, with half the
        nonzeros of the full matrix.
        """
        scale = np.where(self.rows == self.cols, 1.0, 2.0)
        lin = self.rows + self.cols * self.size
        coo = (sp.diags_array(scale) @ self.coeffs).tocoo()
        a = sp.csc_array((coo.data, (lin[coo.row], coo.col)),
                         shape=(self.size * self.size, self.num_vars))
        m0 = np.zeros(self.size * self.size)
        m0[lin] = scale * self.const
        return a, m0


def block_offsets(chain: Chain) -> tuple[int, ...]:
    """Offsets of the input block and each hidden block in `z`, then the total size."""
    sizes = (chain.input_size, *chain.hidden_sizes)
    return tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)]))


def neuron_count(chain: Chain) -> int:
    """Number of hidden neurons (LipSDP-Neuron multipliers)."""
    return int(sum(chain.hidden_sizes))


def num_entries(chain: Chain) -> int:
    """An upper bound on the stored upper-triangle entries of the LMI (for memory estimates)."""
    total = block_offsets(chain)[-1]  # every diagonal entry (rho and -2 lambda)
    for w, (lo, hi) in zip(chain.weights, chain.slopes, strict=True):
        total += int(np.count_nonzero(w))
        if np.any(lo * hi != 0):
            total += w.shape[1] * (w.shape[1] + 1) // 2
    n_last = chain.hidden_sizes[-1]
    return total + n_last * (n_last + 1) // 2


def assemble(chain: Chain, form: Form = Form.NEURON) -> LMI:
    """The LMI of `chain`: sparse map from `(rho, lambda)` to the upper triangle of `M`."""
    blocks = block_offsets(chain)
    size = blocks[-1]
    r_list, c_list, v_list, x_list = [], [], [], []

    def add(rows: np.ndarray, cols: np.ndarray, var: np.ndarray, vals: np.ndarray) -> None:
        r_list.append(rows.astype(np.int64))
        c_list.append(cols.astype(np.int64))
        v_list.append(var.astype(np.int64))
        x_list.append(vals.astype(np.float64))

    n0 = chain.input_size
    idx = np.arange(n0)
    add(idx, idx, np.zeros(n0), -np.ones(n0))  # -rho on the input block
    var0 = 1
    for li, (w, (lo, hi)) in enumerate(zip(chain.weights, chain.slopes, strict=True)):
        p0, q0 = blocks[li], blocks[li + 1]
        n_out = w.shape[0]
        own = np.arange(n_out)
        add(q0 + own, q0 + own, var0 + own, np.full(n_out, -2.0))
        i, p = np.nonzero(w)
        add(p0 + p, q0 + i, var0 + i, (lo + hi)[i] * w[i, p])
        ab = lo * hi
        for k in np.flatnonzero(ab):  # -2ab w_k w_k^T on the previous block
            nz = np.flatnonzero(w[k])
            pr, pc = np.triu_indices(len(nz))
            pr, pc = nz[pr], nz[pc]
            add(p0 + pr, p0 + pc, np.full(len(pr), var0 + k), -2.0 * ab[k] * w[k, pr] * w[k, pc])
        var0 += n_out
    rows = np.concatenate(r_list)
    cols = np.concatenate(c_list)
    var = np.concatenate(v_list)
    vals = np.concatenate(x_list)

    # M0 = last^T last on the last hidden block.
    qL = blocks[-2]
    gram = chain.last.T @ chain.last
    gr, gc = np.triu_indices(gram.shape[0])
    entry_rows = np.concatenate([rows, qL + gr])
    entry_cols = np.concatenate([cols, qL + gc])
    lin = entry_rows + entry_cols * size
    uniq, inverse = np.unique(lin, return_inverse=True)
    n_entries = len(uniq)
    n_map = len(rows)
    coeffs = sp.csr_array((vals, (inverse[:n_map], var)), shape=(n_entries, var0))
    coeffs.sum_duplicates()
    const = np.zeros(n_entries)
    np.add.at(const, inverse[n_map:], gram[gr, gc])
    if form == Form.LAYER:
        coeffs = (coeffs @ layer_summation(chain)).tocsr()
    return LMI(size, (uniq % size).astype(np.int64), (uniq // size).astype(np.int64), coeffs,
               const, blocks, form, int(chain.last.shape[0]))


def layer_summation(chain: Chain) -> sp.csr_array:
    """0/1 map from per-layer multipliers (rho first) to per-neuron ones."""
    owner = np.concatenate([[0], np.repeat(np.arange(1, chain.depth + 1), chain.hidden_sizes)])
    m = len(owner)
    return sp.csr_array((np.ones(m), (np.arange(m), owner)), shape=(m, chain.depth + 1))


def expand_layer_vars(chain: Chain, t_layer: np.ndarray) -> np.ndarray:
    """Per-neuron variables equal to per-layer ones (for reporting in neuron layout)."""
    return layer_summation(chain) @ np.asarray(t_layer, np.float64)
