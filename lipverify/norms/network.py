"""Sound Lipschitz bounds of whole layer sequences as products of per-layer operator norms.

A composition is Lipschitz with the product of its parts' constants; a residual block
`x + body(x)` with `1 + L(body)`; shifts and reshapes are isometries (constant 1); activations
have `Activation.lipschitz` (GroupSort 1: sorting is 1-Lipschitz in every l_p norm, Anil, Lucas,
Grosse, ICML 2019). Every product is rounded upwards.

Three input-to-output norm pairs are tracked per layer, since L-infinity certificates are often
far tighter through a mixed route than through norm equivalence alone:

- `l2`: 2 -> 2 (spectral norms: `lipverify.norms.dense` and `lipverify.norms.conv`);
- `linf`: inf -> inf (largest row L1 norm; elementwise maps keep their constant);
- `linf_to_l2`: inf -> 2 (`sqrt(sum_i ||row_i||_1^2)` for affine maps, else
  `min(sqrt(n_in) l2, sqrt(n_out) linf)`).

An inf -> 2 bound of a sequence is the best split: inf -> inf up to some layer, that layer
inf -> 2, then 2 -> 2 (`chain_inf_to_l2`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lipverify.errors import ModelError
from lipverify.network.layers import Activation, Conv, Dense, Layer, Reshape, Residual, Shift
from lipverify.network.network import Network
from lipverify.norms.conv import (
    EXPLICIT_MAX_ENTRIES,
    TWIST_CANDIDATES,
    conv_inf_norm_bound,
    conv_inf_to_two_bound,
    conv_norm_bound,
)
from lipverify.norms.dense import (
    EPS64,
    abs_sum_upper,
    dense_inf_norm_bound,
    dense_inf_to_two_bound,
    gamma,
    matrix_norm_bound,
    mul_up,
    norm2_upper,
    up,
)
from lipverify.norms.orthogonal import dense_orthogonal_bound
from lipverify.types import Norm

SQRT2_UP = float(up(math.sqrt(2.0)))


@dataclass(frozen=True)
class BoundOptions:
    """How hard to work on convolution bounds.

    Attributes:
        twist_candidates: Twists per axis scanned for the circulant embedding (1: plain circulant).
        explicit_max_entries: Convolutions whose exact matrix has at most this many entries also
            get a dense SVD of that matrix.

    """

    twist_candidates: int = TWIST_CANDIDATES
    explicit_max_entries: int = EXPLICIT_MAX_ENTRIES


DEFAULT_OPTIONS = BoundOptions()


@dataclass(frozen=True)
class LayerBound:
    """Sound Lipschitz bounds of one layer in three norm pairs, and the methods that gave them."""

    kind: str
    l2: float
    linf: float
    linf_to_l2: float
    method: str
    candidates: Mapping[str, float] = field(default_factory=dict)

    def value(self, norm: Norm) -> float:
        """The bound for `norm` -> `norm`."""
        return self.l2 if norm == Norm.L2 else self.linf

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"kind": self.kind, "l2": self.l2, "linf": self.linf,
                "linf_to_l2": self.linf_to_l2, "method": self.method,
                "candidates": dict(self.candidates)}


def _size(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _generic_inf_to_l2(l2: float, linf: float, n_in: int, n_out: int) -> float:
    """`||f(x)-f(y)||_2 <= sqrt(n_in) l2 ||x-y||_inf` and `<= sqrt(n_out) linf ||x-y||_inf`."""
    return min(mul_up(float(up(math.sqrt(n_in))), l2), mul_up(float(up(math.sqrt(n_out))), linf))


def _dense(layer: Dense) -> LayerBound:
    w = layer.weight.detach().cpu().numpy().astype(np.float64)
    spec = matrix_norm_bound(w)
    if not w.size:
        return LayerBound("dense", 0.0, 0.0, 0.0, spec.method, spec.candidates)
    cands = {**spec.candidates, "orthogonal": dense_orthogonal_bound(w).value}
    method = min(cands, key=cands.get)
    return LayerBound("dense", cands[method], dense_inf_norm_bound(w),
                      min(dense_inf_to_two_bound(w),
                          mul_up(float(up(math.sqrt(w.shape[1]))), cands[method])),
                      method, cands)


def _conv(layer: Conv, options: BoundOptions) -> LayerBound:
    spec = conv_norm_bound(layer, options.twist_candidates, options.explicit_max_entries)
    return LayerBound("conv", spec.value, conv_inf_norm_bound(layer),
                      min(conv_inf_to_two_bound(layer),
                          mul_up(float(up(math.sqrt(_size(layer.in_shape)))), spec.value)),
                      spec.method, spec.candidates)


def layer_bound(layer: Layer, options: BoundOptions = DEFAULT_OPTIONS) -> LayerBound:
    """Sound Lipschitz bounds of one layer (L2, L-infinity and inf -> 2)."""
    match layer:
        case Dense():
            return _dense(layer)
        case Conv():
            return _conv(layer, options)
        case Shift() | Reshape():
            n_in, n_out = _size(layer.in_shape), _size(layer.out_shape)
            return LayerBound(type(layer).__name__.lower(), 1.0, 1.0,
                              float(up(math.sqrt(min(n_in, n_out)))), "isometry")
        case Activation():
            lip = float(layer.lipschitz)
            n = _size(layer.in_shape)
            return LayerBound(f"activation:{layer.kind}", lip, lip,
                              _generic_inf_to_l2(lip, lip, n, n), "slope")
        case Residual():
            inner = [layer_bound(b, options) for b in layer.body]
            l2 = float(up(1.0 + product(b.l2 for b in inner)))
            linf = float(up(1.0 + product(b.linf for b in inner)))
            n = _size(layer.in_shape)
            return LayerBound("residual", l2, linf, _generic_inf_to_l2(l2, linf, n, n),
                              "1 + body", {f"body{i}:{b.kind}": b.l2 for i, b in
                                           enumerate(inner)})
    raise ModelError(f"no Lipschitz bound for layer {type(layer).__name__}")


def layer_norm_bound(layer: Layer, norm: Norm = Norm.L2,
                     options: BoundOptions = DEFAULT_OPTIONS) -> float:
    """A sound bound of one layer's Lipschitz constant in `norm` (L2 by default)."""
    return layer_bound(layer, options).value(norm)


def product(values: Sequence[float] | Any) -> float:
    """The product of non-negative floats, rounded upwards at every step."""
    out = 1.0
    for v in values:
        out = mul_up(out, float(v))
    return out


def prefix_products(values: Sequence[float]) -> list[float]:
    """Upward-rounded products of every prefix (`out[i] = values[0] * ... * values[i]`)."""
    out, acc = [], 1.0
    for v in values:
        acc = mul_up(acc, float(v))
        out.append(acc)
    return out


def prefix_bounds(layers: Sequence[Layer], norm: Norm = Norm.L2,
                  options: BoundOptions = DEFAULT_OPTIONS) -> list[float]:
    """Sound Lipschitz bound (in `norm`) of every prefix `layers[:i+1]`."""
    return prefix_products([layer_bound(layer, options).value(norm) for layer in layers])


def chain_inf_to_l2(bounds: Sequence[LayerBound]) -> float:
    """Best inf -> 2 bound of a sequence: min over splits of inf->inf, then inf->2, then 2->2."""
    if not bounds:
        return math.inf  # the identity in dimension n: sqrt(n), unknown here
    best = math.inf
    before = 1.0
    suffix = [1.0] * (len(bounds) + 1)
    for i in range(len(bounds) - 1, -1, -1):
        suffix[i] = mul_up(suffix[i + 1], bounds[i].l2)
    for i, b in enumerate(bounds):
        best = min(best, mul_up(mul_up(before, b.linf_to_l2), suffix[i + 1]))
        before = mul_up(before, b.linf)
    return best


@dataclass(frozen=True)
class NetworkBounds:
    """Everything a Lipschitz certificate of a layer sequence needs, for one input norm.

    The sequence splits into a `body` and, when the last layer is `Dense`, its weight `head`
    (bias irrelevant). For an output row `c`, `c.f` has Lipschitz constant at most
    `row_lipschitz(c)`: `body_l2 * ||c W||_2` in L2; in L-infinity the smaller of
    `body_inf_to_l2 * ||c W||_2` and `body_linf * ||c W||_1`. Without a head, `W` is the identity
    and the body is the whole network. `global_value` bounds the whole map in `norm` -> `norm`.
    """

    norm: Norm
    input_size: int
    num_outputs: int
    layers: tuple[LayerBound, ...]
    head: np.ndarray | None
    body_l2: float
    body_linf: float
    body_inf_to_l2: float
    global_value: float

    def row_lipschitz(self, row: np.ndarray) -> float:
        """A sound Lipschitz bound of `x -> row . f(x)` in the input norm (absolute value out)."""
        r = np.asarray(row, dtype=np.float64)
        if self.head is not None:
            v = r @ self.head
            # |fl(r W) - r W| <= gamma_{K+2} |r| |W| entrywise (Higham 2002, §3.5).
            err = up(gamma(len(r) + 2) * (np.abs(r) @ np.abs(self.head)) * (1 + 4 * EPS64))
        else:
            v, err = r, np.zeros_like(r)
        l2 = float(up(norm2_upper(v) + norm2_upper(err)))
        if self.norm == Norm.L2:
            return mul_up(self.body_l2, l2)
        l1 = float(up(abs_sum_upper(v) + abs_sum_upper(err)))
        return min(mul_up(self.body_inf_to_l2, l2), mul_up(self.body_linf, l1))

    def pairwise(self) -> np.ndarray:
        """`L[y, j]`: a sound Lipschitz bound of `f_y - f_j` (0 on the diagonal).

        Never above `sqrt(2)` times the global L2 bound (resp. twice the L-infinity bound), so a
        pairwise radius is never looser than `margin / (sqrt(2) L)`.
        """
        w = self.head if self.head is not None else np.eye(self.num_outputs)
        k = w.shape[0]
        out = np.zeros((k, k))
        # One correctly rounded subtraction per entry: |exact| <= |computed| (1 + 2u).
        inflate = float(up(1.0 + 4.0 * EPS64))
        cap = mul_up(SQRT2_UP if self.norm == Norm.L2 else 2.0, self.global_value)
        for y in range(k):
            diff = w[y][None, :] - w
            l2 = up(norm2_upper(diff, 1) * inflate)
            if self.norm == Norm.L2:
                row = up(self.body_l2 * l2)
            else:
                l1 = up(abs_sum_upper(diff, 1) * inflate)
                row = np.minimum(up(self.body_inf_to_l2 * l2), up(self.body_linf * l1))
            out[y] = np.minimum(row, cap)
            out[y, y] = 0.0
        return out


def network_bounds(layers: Sequence[Layer], input_size: int, num_outputs: int, norm: Norm,
                   options: BoundOptions = DEFAULT_OPTIONS,
                   bounds: Sequence[LayerBound] | None = None) -> NetworkBounds:
    """Body/head bounds of a layer sequence for inputs perturbed in `norm`."""
    per_layer = tuple(bounds) if bounds is not None else tuple(
        layer_bound(layer, options) for layer in layers)
    head = None
    body = per_layer
    if layers and isinstance(layers[-1], Dense):
        head = layers[-1].weight.detach().cpu().numpy().astype(np.float64)
        body = per_layer[:-1]
    sqrt_n = float(up(math.sqrt(input_size)))
    body_l2 = product(b.l2 for b in body)
    body_linf = product(b.linf for b in body)
    body_inf_to_l2 = min(mul_up(sqrt_n, body_l2), chain_inf_to_l2(body))
    total_l2 = product(b.l2 for b in per_layer)
    if norm == Norm.L2:
        global_value = total_l2
    else:  # ||.||_inf <= ||.||_2 on the outputs
        global_value = min(product(b.linf for b in per_layer), mul_up(sqrt_n, total_l2),
                           chain_inf_to_l2(per_layer))
    return NetworkBounds(norm, input_size, num_outputs, per_layer, head, body_l2, body_linf,
                         body_inf_to_l2, global_value)


def pairwise_lipschitz(network: Network, norm: Norm,
                       options: BoundOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """`(K, K)` sound Lipschitz bounds of `f_y - f_j` for `network` (uncached; see the backend)."""
    bounds = network_bounds(network.require_layers(), network.input_size, network.num_outputs,
                            norm, options)
    return bounds.pairwise()
