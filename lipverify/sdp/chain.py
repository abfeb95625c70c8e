"""Feed-forward chains: the only network shape LipSDP reads.

A `Chain` is `f(x) = last @ phi_L(W_{L-1} ... phi_1(W_0 x))` (biases dropped: they do not change
Lipschitz constants), with a per-neuron slope interval `[lo_i, hi_i]` for every hidden neuron.
Two affine maps in a row are kept apart by an identity "activation" with slopes `[1, 1]` (whose
quadratic constraint forces the output to equal the input) instead of multiplying the matrices:
a float product would change the network the bound speaks about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lipverify.errors import InputError
from lipverify.network.layers import Activation, Conv, Dense, Layer, Reshape, Residual, Shift

# Largest number of scalar inputs of a convolution turned into its dense matrix.
MAX_CONV_MATRIX_INPUTS = 8192


@dataclass(frozen=True, eq=False)
class Chain:
    """`last @ phi_L(W_{L-1} ... phi_1(W_0 x))` with per-neuron slope intervals.

    `weights[l]` maps layer `l` (the input for `l = 0`) to hidden layer `l + 1`; `slopes[l]`
    holds `(lo, hi)` arrays of hidden layer `l + 1`; `last` maps the last hidden layer to the
    outputs (a row `c^T W_L` for the margin of a class pair).
    """

    weights: tuple[np.ndarray, ...]
    slopes: tuple[tuple[np.ndarray, np.ndarray], ...]
    last: np.ndarray

    def __post_init__(self) -> None:
        if not self.weights:
            raise InputError("a LipSDP chain needs at least one hidden layer")
        if len(self.weights) != len(self.slopes):
            raise InputError(f"{len(self.weights)} weight matrices but {len(self.slopes)} "
                             "slope intervals")
        prev = self.weights[0].shape[1]
        for li, (w, (lo, hi)) in enumerate(zip(self.weights, self.slopes, strict=True)):
            if w.ndim != 2 or w.shape[1] != prev:
                raise InputError(f"weight {li} has shape {w.shape}, expected (*, {prev})")
            if lo.shape != (w.shape[0],) or hi.shape != (w.shape[0],):
                raise InputError(f"slopes of hidden layer {li + 1} do not have {w.shape[0]} "
                                 "entries")
            if np.any(lo > hi) or not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
                raise InputError(f"slopes of hidden layer {li + 1} are not finite intervals")
            prev = w.shape[0]
        if self.last.ndim != 2 or self.last.shape[1] != prev:
            raise InputError(f"last weight has shape {self.last.shape}, expected (*, {prev})")

    @property
    def input_size(self) -> int:
        """Number of inputs."""
        return int(self.weights[0].shape[1])

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        """Widths of the hidden layers."""
        return tuple(int(w.shape[0]) for w in self.weights)

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return len(self.weights)

    def with_last(self, last: np.ndarray) -> Chain:
        """The same chain with another output map (e.g. a margin row `c^T W_L`)."""
        return Chain(self.weights, self.slopes, np.atleast_2d(np.asarray(last, np.float64)))

    def forward(self, x: np.ndarray, phis: tuple) -> np.ndarray:
        """Evaluate with given elementwise functions `phis` (tests and sampling only)."""
        h = np.asarray(x, np.float64)
        for w, phi in zip(self.weights, phis, strict=True):
            h = phi(h @ w.T)
        return h @ self.last.T


def _matrix(layer: Dense | Conv) -> np.ndarray:
    if isinstance(layer, Dense):
        return layer.weight.detach().cpu().double().numpy()
    if math.prod(layer.in_shape) > MAX_CONV_MATRIX_INPUTS:
        raise InputError(f"convolution on {math.prod(layer.in_shape)} inputs is too large for "
                         f"its dense matrix (limit {MAX_CONV_MATRIX_INPUTS})")
    return layer.matrix().detach().cpu().double().numpy()


def unsupported_reason(layers: tuple[Layer, ...]) -> str | None:
    """None when `layers` can become a `Chain`, else why not."""
    for layer in layers:
        if isinstance(layer, Residual):
            return "residual blocks are not feed-forward (LipSDP needs a chain)"
        if isinstance(layer, Activation) and not layer.elementwise:
            return f"{layer.kind} is not an elementwise slope-restricted activation"
        if isinstance(layer, Conv) and math.prod(layer.in_shape) > MAX_CONV_MATRIX_INPUTS:
            return (f"convolution on {math.prod(layer.in_shape)} inputs exceeds the dense-matrix "
                    f"limit {MAX_CONV_MATRIX_INPUTS}")
    if not any(isinstance(layer, Activation) for layer in layers):
        return "no activation: the network is affine (its exact Lipschitz constant is a norm)"
    return None


def chain_from_layers(layers: tuple[Layer, ...]) -> Chain:
    """The chain of a feed-forward layer view (convolutions become their exact matrices).

    Shifts and reshapes do not change Lipschitz constants and are skipped; consecutive affine
    maps are separated by an identity activation with slopes `[1, 1]`.
    """
    why = unsupported_reason(layers)
    if why is not None:
        raise InputError(f"not a LipSDP chain: {why}")
    weights: list[np.ndarray] = []
    slopes: list[tuple[np.ndarray, np.ndarray]] = []
    pending: np.ndarray | None = None
    for layer in layers:
        if isinstance(layer, (Shift, Reshape)):
            continue
        if isinstance(layer, (Dense, Conv)):
            mat = _matrix(layer)
            if pending is not None:
                n = pending.shape[0]
                weights.append(pending)
                slopes.append((np.ones(n), np.ones(n)))
            pending = mat
        elif isinstance(layer, Activation):
            n = math.prod(layer.in_shape)
            if pending is None:
                pending = np.eye(n)
            lo, hi = layer.slopes
            weights.append(pending)
            slopes.append((np.full(n, float(lo)), np.full(n, float(hi))))
            pending = None
    if pending is None:
        pending = np.eye(weights[-1].shape[0])
    return Chain(tuple(weights), tuple(slopes), pending)


def split_chain(chain: Chain, hidden_per_chunk: int) -> list[Chain]:
    """Consecutive sub-chains of at most `hidden_per_chunk` hidden layers each.

    Chunk `i` ends at an activation (its output map is the identity) and chunk `i + 1` starts
    with the next weight, so the network is their composition and the product of their
    Lipschitz bounds bounds it.
    """
    if hidden_per_chunk < 1:
        raise InputError(f"split must be a positive number of hidden layers, got "
                         f"{hidden_per_chunk}")
    chunks = []
    for start in range(0, chain.depth, hidden_per_chunk):
        stop = min(start + hidden_per_chunk, chain.depth)
        last = chain.last if stop == chain.depth else np.eye(chain.weights[stop - 1].shape[0])
        chunks.append(Chain(chain.weights[start:stop], chain.slopes[start:stop], last))
    return chunks


def power_of_two_scales(chain: Chain) -> tuple[Chain, tuple[int, ...]]:
    """The chain with every matrix scaled by a power of two to spectral norm in [0.5, 1).

    Returns the scaled chain and the exponents `k_l` (`W'_l = 2^-k_l W_l`, the output map
    last); a LipSDP bound `L'` of the scaled chain gives `L' * 2**sum(k)` for the original.
    Scaling by powers of two is exact in floating point, and LipSDP is homogeneous (the slope
    intervals do not change when `u -> s u`, `phi -> s phi(./s)`), so the bound scales exactly;
    it keeps the SDP well conditioned.
    """
    exponents = []
    mats = []
    for w in (*chain.weights, chain.last):
        norm = float(np.linalg.norm(w, 2)) if w.size else 0.0
        k = 0 if norm == 0 or not math.isfinite(norm) else math.frexp(norm)[1]
        mats.append(np.ldexp(w, -k))
        exponents.append(k)
    return Chain(tuple(mats[:-1]), chain.slopes, mats[-1]), tuple(exponents)


def reduce_input(chain: Chain) -> Chain:
    """The same LipSDP optimum with an input block of size `rank(W_0)` instead of `n_0`.

    Why the optimum is the same: with the thin SVD `W_0 = U S V^T` (`V` is `n_0 x r`) and
    `[V, V_perp]` orthogonal, write `x = V y + V_perp y'`. Then `W_0 x = (U S) y`, so in these
    coordinates the LipSDP matrix is block diagonal: `M_r` (the matrix of the chain whose first
    weight is `U S`, input `y`) and `-rho I` on `y'`, which touches nothing else. An orthogonal
    change of coordinates keeps eigenvalues, so for `rho >= 0`, `M <= 0` iff `M_r <= 0`: both
    problems have the same feasible `(rho, lambda)` and the same optimum. (The bound itself is
    always checked on the full matrix, so rounding in the SVD cannot make it unsound.)
    """
    w0 = chain.weights[0]
    if w0.shape[1] <= w0.shape[0]:
        return chain
    u, s, _ = np.linalg.svd(w0, full_matrices=False)
    keep = s > s[0] * max(w0.shape) * np.finfo(np.float64).eps if len(s) and s[0] > 0 else \
        np.zeros(len(s), dtype=bool)
    keep[0] = True  # at least one input direction
    return Chain((u[:, keep] * s[keep], *chain.weights[1:]), chain.slopes, chain.last)


def drop_constant_neurons(chain: Chain) -> tuple[Chain | None, list[np.ndarray]]:
    """The chain without neurons of slope interval `[0, 0]`, and which neurons were kept.

    Such a neuron is constant, so it only shifts the next layer like a bias: removing it (its
    row of `W_l` and its column of `W_{l+1}`) leaves the same Lipschitz constant, exactly.
    LipSDP itself reaches that only as their multipliers go to infinity. Returns `None` for the
    chain when a whole layer is constant (the network is then constant).
    """
    keep = [~((lo == 0) & (hi == 0)) for lo, hi in chain.slopes]
    if all(np.all(k) for k in keep):
        return chain, keep
    if not all(np.any(k) for k in keep):
        return None, keep
    weights = []
    for li, w in enumerate(chain.weights):
        w = w[keep[li]]
        if li > 0:
            w = w[:, keep[li - 1]]
        weights.append(w)
    slopes = tuple((lo[k], hi[k]) for (lo, hi), k in zip(chain.slopes, keep, strict=True))
    return Chain(tuple(weights), slopes, chain.last[:, keep[-1]]), keep
