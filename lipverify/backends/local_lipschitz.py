"""The `local` backend: local Lipschitz bounds on the neurons CROWN cannot fix.

Over a ball `B(x0, r)`, CROWN's pre-activation bounds `[l, u]` fix each neuron's slope interval:
a ReLU with `u <= 0` is constant 0 on the ball (slope 0), one with `l >= 0` is the identity
(slope 1), the rest have Clarke slopes in `[0, 1]` (tanh, sigmoid and leaky ReLU: the derivative's
range on `[l, u]`). Every generalised Jacobian of a row `g = c.f - d` on the ball then has the
form `c W_L D_{L-1} W_{L-1} ... D_1 W_1` with each `D_k` diagonal inside those intervals.

Soundness. The ball is convex, so for `x` in it `g(x) - g(x0)` is the integral of the gradient
along the segment (`g` is Lipschitz, hence absolutely continuous on the segment), and
`|g(x) - g(x0)| <= sup_J ||J||_* ||x - x0||` with `||.||_*` the dual norm. Two bounds on
`sup_J ||J||_*` are computed and the smaller kept:

- interval Jacobian (Fast-Lip, Weng et al., ICML 2018): propagate `c` backwards through the
  layers as an interval vector, multiplying exactly by each `W_k` (centre by `W`, radius by
  `|W|`) and by the interval `D_k` (endpoint products); every admissible `J` lies in the result,
  so `||J||_* <= || |centre| + radius ||_*`. For boxes the deviation is `sum_i (|centre| +
  radius)_i h_i` with `h` the half-widths.
- masked operator norms (L2): `||J||_2 <= ||W_L^T c||_2 prod_k ||M_k W_k||_2` with
  `M_k = diag(max |D_k|)`: `|D_k W_k x| <= M_k |W_k x|` entrywise and the 2-norm is monotone in
  absolute values, so `||D_k W_k|| <= ||M_k W_k||`, the row-masked matrix (inactive rows
  removed); `||W D W'||` with `D` between 0 and I is NOT bounded by the `D = I` norm in general,
  which is why each factor carries its own mask. Norms are exact (eigenvalues of the masked Gram
  matrix, float64, rounded up) when small, else `min(Frobenius, sqrt(||.||_1 ||.||_inf))`.

Radius `r` is certified when `g(x0) - r L(r) > 0` for every term (some row), with `L(r)` from the
ball of radius `r`; the radius search bisects on `r` with the masks recomputed at each probe.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lipverify.backends._lirpa_compat import MODULE, lirpa_availability
from lipverify.backends._margin_search import (
    Outcomes,
    Region,
    Spec,
    bisect_radius,
    deadline_of,
    first_radius,
)
from lipverify.backends.base import BackendBase, BackendOptions
from lipverify.backends.lirpa import LirpaAdapter, LirpaOptions
from lipverify.errors import BackendUnavailable, LipverifyError, ModelError
from lipverify.margins import LIPSCHITZ_REL_SLACK
from lipverify.network.layers import Activation, Conv, Dense, Layer, Reshape, Residual, Shift
from lipverify.network.network import Network
from lipverify.types import Certificate, Norm, Problem, Scope

# Largest masked matrix (entries, times the batch) whose spectral norm is computed exactly.
DENSE_NORM_LIMIT = 2 ** 24
_ELEMENTWISE = ("relu", "leaky_relu", "tanh", "sigmoid")


@dataclass(frozen=True)
class LocalOptions(BackendOptions):
    """Options of the `local` backend.

    Attributes:
        batch_size: Most inputs per bound computation.
        memory_budget_gb: Memory one CROWN call may use; larger batches are split.
        radius_rel_tol: Relative width of the bracket the certified-radius search stops at.
        dense_norm_limit: Largest masked matrix (entries x batch) normed exactly.
    """

    batch_size: int = 512
    memory_budget_gb: float = 2.0
    radius_rel_tol: float = 0.01
    dense_norm_limit: int = DENSE_NORM_LIMIT


def slope_interval(layer: Activation, lower: torch.Tensor,
                   upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval of every difference quotient of the activation on `[lower, upper]`, per neuron."""
    if layer.kind in ("relu", "leaky_relu"):
        neg = layer.param if layer.kind == "leaky_relu" else 0.0
        lo_s, hi_s = min(neg, 1.0), max(neg, 1.0)
        def const(v: float) -> torch.Tensor:  # in lower's dtype: a float32 0.1 exceeds 0.1
            return torch.full_like(lower, v)

        lo = torch.where(lower >= 0, const(1.0), torch.where(upper <= 0, const(neg), const(lo_s)))
        hi = torch.where(lower >= 0, const(1.0), torch.where(upper <= 0, const(neg), const(hi_s)))
        return lo, hi
    if layer.kind not in ("tanh", "sigmoid"):
        raise ModelError(f"no slope interval for activation {layer.kind!r}")
    # Both derivatives are even, peak at 0 and decrease in |z|.
    deriv = (lambda z: 1 - torch.tanh(z) ** 2) if layer.kind == "tanh" else \
        (lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)))
    nearest = torch.where((lower <= 0) & (upper >= 0), torch.zeros_like(lower),
                          torch.minimum(lower.abs(), upper.abs()))
    farthest = torch.maximum(lower.abs(), upper.abs())
    return deriv(farthest) * (1 - 1e-12), deriv(nearest) * (1 + 1e-12)


def _abs_layer(layer: Dense | Conv) -> Dense | Conv:
    return dataclasses.replace(layer, weight=layer.weight.abs())


def _dense_matrix(layer: Dense | Conv) -> torch.Tensor:
    return layer.weight if isinstance(layer, Dense) else layer.matrix()


class LocalJacobian:
    """Bounds on the Jacobians of rows `c.f` given per-neuron slope intervals (float64).

    Args:
        layers: A feed-forward layer view with elementwise activations.
        dense_norm_limit: Largest masked matrix (entries x batch) normed exactly.
    """

    def __init__(self, layers: tuple[Layer, ...], dense_norm_limit: int = DENSE_NORM_LIMIT) -> None:
        self.layers = layers
        self.limit = dense_norm_limit
        self._abs = {id(x): _abs_layer(x) for x in layers if isinstance(x, (Dense, Conv))}
        self._grams: dict[int, torch.Tensor | None] = {}

    def interval_magnitude(self, slopes: list[tuple[torch.Tensor, torch.Tensor]],
                           rows: torch.Tensor) -> torch.Tensor:
        """`|centre| + radius` of the interval Jacobian of each row: shape `(B, S, inputs)`."""
        b, s, k = rows.shape
        centre = rows.reshape(b * s, k)
        radius = torch.zeros_like(centre)
        acts = iter(reversed(slopes))
        for layer in reversed(self.layers):
            if isinstance(layer, (Dense, Conv)):
                centre = layer.adjoint(centre)
                radius = self._abs[id(layer)].adjoint(radius)
            elif isinstance(layer, Activation):
                lo, hi = (t.reshape(b, 1, -1).expand(b, s, -1).reshape(b * s, -1)
                          for t in next(acts))
                shape = centre.shape
                c_lo, c_hi = (centre - radius).reshape(b * s, -1), (centre + radius).reshape(
                    b * s, -1)
                prods = torch.stack([c_lo * lo, c_lo * hi, c_hi * lo, c_hi * hi])
                p_lo, p_hi = prods.min(dim=0).values, prods.max(dim=0).values
                centre, radius = ((p_lo + p_hi) / 2).reshape(shape), ((p_hi - p_lo) / 2).reshape(
                    shape)
            elif isinstance(layer, Reshape):
                centre = centre.reshape((b * s, *layer.in_shape))
                radius = radius.reshape((b * s, *layer.in_shape))
        mag = centre.abs() + radius
        return mag.reshape(b, s, -1)

    def _gram(self, layer: Dense | Conv) -> torch.Tensor | None:
        """`W W^T` or `W^T W` (the smaller), if small enough to keep."""
        if id(layer) not in self._grams:
            out_n, in_n = math.prod(layer.out_shape), math.prod(layer.in_shape)
            gram = None
            if out_n * in_n <= self.limit:
                w = _dense_matrix(layer)
                gram = w @ w.T if out_n <= in_n else w
            self._grams[id(layer)] = gram
        return self._grams[id(layer)]

    def _masked_norm(self, layer: Dense | Conv, mask: torch.Tensor) -> torch.Tensor:
        """Upper bound on `||diag(mask) W||_2` per input (mask shape `(B, outputs)`)."""
        b = mask.shape[0]
        gram = self._gram(layer)
        out_n, in_n = math.prod(layer.out_shape), math.prod(layer.in_shape)
        side = min(out_n, in_n)
        if gram is not None and b * side * side <= self.limit:
            if out_n <= in_n:  # M W W^T M
                g = mask[:, :, None] * gram[None] * mask[:, None, :]
            else:  # W^T M^2 W
                g = torch.einsum("oi,bo,oj->bij", gram, mask ** 2, gram)
            top = torch.linalg.eigvalsh(g)[:, -1].clamp_min(0)
            return top.sqrt() * (1 + 1e3 * torch.finfo(torch.float64).eps * side)
        abs_layer = self._abs[id(layer)]
        ones = torch.ones((b, *layer.in_shape), dtype=torch.float64)
        row_abs = abs_layer.linear(ones).reshape(b, -1)
        sq = dataclasses.replace(layer, weight=layer.weight ** 2)
        row_sq = sq.linear(ones).reshape(b, -1)
        col_abs = abs_layer.adjoint(mask.reshape((b, *layer.out_shape))).reshape(b, -1)
        inf_norm = (mask * row_abs).max(dim=1).values
        one_norm = col_abs.max(dim=1).values
        frob = ((mask ** 2) * row_sq).sum(dim=1).sqrt()
        return torch.minimum(frob, (inf_norm * one_norm).sqrt()) * (1 + 1e-12)

    def norm_product(self, slopes: list[tuple[torch.Tensor, torch.Tensor]],
                     rows: torch.Tensor) -> torch.Tensor:
        """L2 bound `||W_L^T c|| prod_k ||M_k W_k ... ||` per row: shape `(B, S)`."""
        b, s, k = rows.shape
        factor = torch.ones(b, dtype=torch.float64)
        segment: list[Dense | Conv] = []
        acts = iter(slopes)
        for layer in self.layers:
            if isinstance(layer, (Dense, Conv)):
                segment.append(layer)
            elif isinstance(layer, Activation):
                lo, hi = next(acts)
                mask = torch.maximum(lo.abs(), hi.abs()).reshape(b, -1)
                if not segment:
                    factor = factor * mask.max(dim=1).values
                for i, aff in enumerate(reversed(segment)):
                    factor = factor * self._masked_norm(aff, mask if i == 0 else
                                                        torch.ones_like(factor)[:, None].expand(
                                                            b, math.prod(aff.out_shape)))
                segment = []
        g = rows.reshape(b * s, k)
        for aff in reversed(segment):
            g = aff.adjoint(g)
        return factor[:, None] * g.reshape(b, s, -1).norm(dim=2)


def _check_layers(network: Network) -> str | None:
    """None when the layer view suits local Lipschitz bounds, else why not."""
    if network.layers is None:
        return f"local needs the layer view: {network.unsupported}"
    for layer in network.layers:
        if isinstance(layer, Residual):
            return "local does not handle residual blocks"
        if isinstance(layer, Activation) and layer.kind not in _ELEMENTWISE:
            return f"local does not handle {layer.kind} activations"
        if not isinstance(layer, (Dense, Conv, Activation, Reshape, Shift)):
            return f"local does not handle {type(layer).__name__} layers"
    return None


class LocalLipschitzBackend(BackendBase):
    """Local Lipschitz certificates on the sub-network CROWN leaves unstable.

    Weng et al., "Towards Fast Computation of Certified Robustness for ReLU Networks", ICML 2018
    (Fast-Lip, https://arxiv.org/abs/1804.09699), with pre-activation bounds from CROWN (Zhang
    et al., NeurIPS 2018) computed by auto_LiRPA (Xu et al., NeurIPS 2020).

    Proves, per input, a radius `r` with `margin(x0) - r L(r) > 0`, `L(r)` a sound bound on the
    local Lipschitz constant of each margin row over the ball of radius `r` (L2 or L-infinity;
    boxes use the half-widths): sound, local scope. See the module docstring for the argument.
    Cost: one CROWN pass for the masks and one backward interval pass per probe (35).

    Args:
        options: `LocalOptions` (batch size, memory budget, radius tolerance, dense-norm limit).

    Example:
        >>> from lipverify.backends.local_lipschitz import LocalLipschitzBackend
        >>> LocalLipschitzBackend().name
        'local'
    """

    name: ClassVar[str] = "local"
    cost: ClassVar[int] = 35
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2, Norm.LINF})
    scopes: ClassVar[frozenset[Scope]] = frozenset({Scope.LOCAL})
    sound: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = (MODULE,)
    Options: ClassVar[type] = LocalOptions

    def __init__(self, options: LocalOptions | None = None) -> None:
        super().__init__(options)
        self._cache: dict[str, tuple[LirpaAdapter, LocalJacobian] | str] = {}

    def availability(self) -> str | None:
        """None when auto_LiRPA loads here, else why not."""
        return super().availability() or lirpa_availability()

    def _parts(self, network: Network) -> tuple[LirpaAdapter, LocalJacobian]:
        key = network.fingerprint
        if key not in self._cache:
            why = _check_layers(network)
            if why is None:
                opts = LirpaOptions(batch_size=self.options.batch_size,
                                    memory_budget_gb=self.options.memory_budget_gb)
                try:
                    adapter = LirpaAdapter(network, opts, use_layers=True)
                    acts = [x for x in network.layers if isinstance(x, Activation)]
                    widths = [math.prod(a.inputs[0].output_shape[1:])
                              for a in adapter.activations]
                    if widths != [math.prod(a.in_shape) for a in acts]:
                        why = "auto_LiRPA's activations do not match the layer view"
                    else:
                        self._cache[key] = (adapter, LocalJacobian(
                            network.layers, self.options.dense_norm_limit))
                except (ModelError, BackendUnavailable) as exc:
                    why = str(exc)
            if why is not None:
                self._cache[key] = why
        found = self._cache[key]
        if isinstance(found, str):
            raise ModelError(found)
        return found

    def supports(self, network: Network, problem: Problem) -> str | None:
        """None when the layer view and auto_LiRPA allow local bounds here, else why not."""
        why = super().supports(network, problem)
        if why:
            return why
        try:
            self._parts(network)
        except LipverifyError as exc:
            return str(exc)
        return None

    def deviations(self, network: Network, region: Region, rows: np.ndarray) -> np.ndarray:
        """Bounds on `|c.f(x) - c.f(x0)|` over each region, per row `c` (shape `(B, S)`)."""
        adapter, jac = self._parts(network)
        layers = [x for x in network.layers if isinstance(x, Activation)]
        bounds = adapter.preactivation_bounds(region)
        slopes = [slope_interval(act, torch.from_numpy(lo), torch.from_numpy(hi))
                  for act, (lo, hi) in zip(layers, bounds, strict=True)]
        rows_t = torch.as_tensor(rows, dtype=torch.float64)
        mag = jac.interval_magnitude(slopes, rows_t)
        if region.is_box:
            half = torch.as_tensor((region.upper - region.lower) / 2).reshape(len(region), 1, -1)
            return (mag * half).sum(dim=2).numpy() * (1 + LIPSCHITZ_REL_SLACK)
        lip = mag.norm(p=1 if region.norm == Norm.LINF else 2, dim=2)
        if region.norm == Norm.L2:
            lip = torch.minimum(lip, jac.norm_product(slopes, rows_t))
        return lip.numpy() * region.eps[:, None] * (1 + LIPSCHITZ_REL_SLACK)

    def local_lipschitz(self, network: Network, region: Region, rows: np.ndarray) -> np.ndarray:
        """Sound local Lipschitz bounds of each row `c.f` on each ball (shape `(B, S)`)."""
        if region.is_box:
            raise ModelError("a box has no single radius: use deviations()")
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.deviations(network, region, rows) / region.eps[:, None]

    def certify(self, network: Network, problem: Problem) -> list[Certificate]:
        """One certificate per input: the local bound at eps, and the radius when asked for."""
        start = time.perf_counter()
        deadline = deadline_of(problem, self.options.timeout)
        region = Region.of(problem.perturbation, problem.inputs)
        outputs = network.forward(region.centres)
        spec = Spec.build(problem.properties, network.num_outputs)
        slack = spec.slack(outputs)
        values = spec.row_values(outputs)
        centre = spec.combine(values)
        eps = problem.perturbation.eps

        def margins_at(index: np.ndarray, radii: np.ndarray) -> np.ndarray:
            sub = region.subset(index) if region.is_box else region.subset(index).with_eps(radii)
            dev = self.deviations(network, sub, spec.c[index])
            return spec.subset(index).combine(values[index] - dev) - slack[index]

        searchable = centre > slack
        n = len(problem)
        if deadline is not None and time.monotonic() > deadline:
            outcomes = Outcomes(centre, slack, np.full(n, np.nan), np.zeros(n),
                                np.zeros(n, bool), True)
        elif problem.want_radius and not region.is_box:
            first = np.where(searchable, first_radius(eps, n), 0.0)
            radius, at_first = bisect_radius(margins_at, first, self.options.radius_rel_tol,
                                             None, deadline)
            late = deadline is not None and time.monotonic() > deadline
            outcomes = Outcomes(centre, slack, np.where(first == eps, at_first, np.nan), radius,
                                (radius >= eps) & (radius > 0), late)
        else:
            margin = margins_at(np.arange(n), region.eps)
            outcomes = Outcomes(centre, slack, margin, np.where(margin > 0, eps, 0.0), margin > 0)
        seconds = (time.perf_counter() - start) / max(n, 1)
        return outcomes.certificates(self.name, region.centres, seconds)
