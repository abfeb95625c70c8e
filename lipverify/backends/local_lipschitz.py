"""The `local` backend: local Lipschitz bounds on the neurons CROWN cannot fix.

Over a ball `B(x0, r)`, CROWN's pre-activation bounds `[l, u]` fix each neuron's slope interval:
a ReLU with `u <= 0` is constant 0 on the ball (slope 0), one with `l >= 0` is the identity
(slope 1), the rest have Clarke slopes in `[0, 1]` (tanh, sigmoid and leaky ReLU: the derivative's
range on `[l, u]`). Every generalised Jacobian of a row `g = c.f - d` on the ball then has the
form `c W_L D_{L-1} W_{L-1} ... D_1 W_1` with each `D_k` diagonal inside those intervals.

Soundness. The ball is convex, so for `x` in it `g(x) - g(x0)` is the integral of the gradient
along the segment (`g` is Lipschitz, hence absolutely continuous on the segment), and
`|g(x) - g(x0)| <= sup_J ||J||_* ||x - x0||` with `||.||_*` the dual norm. Several bounds on
`sup_J ||J||_*` are computed and the smallest kept:

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
  Under L-infinity the L2 bound also serves, through `||J||_1 <= sqrt(n) ||J||_2`; for boxes
  through `|J d| <= ||J||_2 ||h||_2`.
- the global bound of `lipverify.norms` (products of layer norms, valid on every ball) caps them,
  so `local` never certifies less than a global Lipschitz constant would.
- optionally (`lipsdp_rows`, L2, at the budget): masked LipSDP (`lipverify.sdp.lipsdp_bound`
  with the per-neuron slope intervals), a proven L2 bound of the same Jacobian set.

Radius `r` is certified when `g(x0) - r L(r) > 0` for every term (some row), with `L(r)` from the
ball of radius `r`; the radius search bisects on `r` with the masks recomputed at each probe.
Since `L(r)` holds on every smaller ball, each probe also certifies `min(r, g(x0) / L(r))`, and
the largest such radius is kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from lipverify.backends._lirpa_adapter import LirpaAdapter, LirpaOptions
from lipverify.backends._lirpa_compat import MODULE, lirpa_availability
from lipverify.backends._local_jacobian import DENSE_NORM_LIMIT, LocalJacobian, slope_interval
from lipverify.backends._margin_search import (
    CentreFacts,
    Outcomes,
    Region,
    Spec,
    bisect_radius,
    deadline_of,
    first_radius,
)
from lipverify.backends.base import BackendBase, BackendOptions
from lipverify.errors import BackendUnavailable, LipverifyError, ModelError
from lipverify.margins import LIPSCHITZ_REL_SLACK
from lipverify.network.layers import Activation, Conv, Dense, Reshape, Residual, Shift
from lipverify.network.network import Network
from lipverify.norms import LayerBound, layer_bound, network_bounds
from lipverify.types import Certificate, Norm, Problem, Scope, deadline_passed

log = logging.getLogger(__name__)

_ELEMENTWISE = ("relu", "leaky_relu", "tanh", "sigmoid")


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class LocalOptions(BackendOptions):
    """Options of the `local` backend (`help` metadata documents each for configs)."""

    batch_size: int = _help(512, "Most inputs per bound computation.")
    memory_budget_gb: float = _help(2.0, "Memory one CROWN call may use; larger batches are "
                                         "split.")
    radius_rel_tol: float = _help(0.01, "Relative width of the bracket a radius search stops at.")
    dense_norm_limit: int = _help(DENSE_NORM_LIMIT, "Largest layer matrix (entries) kept dense "
                                                    "for exact masked spectral norms.")
    lipsdp_rows: int = _help(0, "Under L2 at the budget, inputs left unverified with at most "
                                "this many failing rows get masked LipSDP on them (0: never).")


def _reach(spec: Spec, values: np.ndarray, lower: np.ndarray, slack: np.ndarray,
           radii: np.ndarray) -> np.ndarray:
    """Radius certified by one probe: `min(r, (g(x0) - slack) / L_g(r))`, rounded down.

    `L_g(r) = (g(x0) - lower) / r` bounds the Lipschitz constant of row `g` on the ball of
    radius `r`, hence on every smaller ball: a probe that fails at `r` still certifies the
    radius where each term's best row reaches zero.
    """
    room = values - slack[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lip = (values - lower) / radii[:, None]
        rows = np.where(room > 0, np.minimum(radii[:, None], np.where(
            lip > 0, np.nextafter(room / lip, 0), np.inf)), 0.0)
    return np.minimum(np.nextafter(spec.combine(rows), 0), radii)


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
        self._layer_bounds: dict[str, tuple[LayerBound, ...] | None] = {}

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

    def slopes(self, network: Network,
               region: Region) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per activation, the slope intervals of its neurons over each region (`(B, n)` each)."""
        adapter = self._parts(network)[0]
        acts = [x for x in network.layers if isinstance(x, Activation)]
        bounds = adapter.preactivation_bounds(region)
        return [slope_interval(act, torch.from_numpy(lo), torch.from_numpy(hi))
                for act, (lo, hi) in zip(acts, bounds, strict=True)]

    def refine_with_lipsdp(self, network: Network, region: Region, spec: Spec,
                           values: np.ndarray, row_lower: np.ndarray,
                           slack: np.ndarray) -> np.ndarray:
        """Raise row lower bounds `g(x0) - eps L` by masked LipSDP where few rows fail (L2)."""
        segments = self._parts(network)[1].segments()
        if segments is None or region.norm != Norm.L2 or region.is_box:
            return row_lower
        out = row_lower.copy()
        real = np.isnan(spec.fill)
        for i in range(len(region)):
            failing = np.flatnonzero(real[i] & (row_lower[i] <= slack[i]))
            if spec.combine(row_lower[i:i + 1])[0] > slack[i] or not 0 < len(failing) <= \
                    self.options.lipsdp_rows:
                continue
            from lipverify.sdp import lipsdp_bound  # cvxpy and the SDP stack only when asked

            slopes = [(lo[0].numpy(), hi[0].numpy())
                      for lo, hi in self.slopes(network, region.subset(np.array([i])))]
            for r in failing:
                try:
                    lip = lipsdp_bound([*segments[:-1], (spec.c[i, r] @ segments[-1])[None]],
                                       slopes).value
                except LipverifyError as exc:
                    log.info("masked LipSDP failed on input %d: %s", i, exc)
                    break
                out[i, r] = max(row_lower[i, r], values[i, r] - region.eps[i] * lip *
                                (1 + LIPSCHITZ_REL_SLACK))
        return out

    def deviations(self, network: Network, region: Region, rows: np.ndarray) -> np.ndarray:
        """Bounds on `|c.f(x) - c.f(x0)|` over each region, per row `c` (shape `(B, S)`)."""
        jac = self._parts(network)[1]
        slopes = self.slopes(network, region)
        rows_t = torch.as_tensor(rows, dtype=torch.float64)
        mag = jac.interval_magnitude(slopes, rows_t)
        l2 = torch.minimum(mag.norm(dim=2), jac.norm_product(slopes, rows_t))
        whole = self.global_rows(network, region.norm, rows)  # valid everywhere
        if region.is_box:  # |J d| <= sum_i |J_i| h_i and <= ||J||_2 ||h||_2
            half = torch.as_tensor((region.upper - region.lower) / 2).reshape(len(region), 1, -1)
            dev = torch.minimum((mag * half).sum(dim=2), l2 * half.norm(dim=2)).numpy()
            return np.minimum(dev, whole * region.eps[:, None]) * (1 + LIPSCHITZ_REL_SLACK)
        if region.norm == Norm.LINF:  # ||J||_1 <= sqrt(n) ||J||_2
            lip = torch.minimum(mag.sum(dim=2), l2 * math.sqrt(mag.shape[2]))
        else:
            lip = l2
        lip = np.minimum(lip.numpy(), whole)
        return lip * region.eps[:, None] * (1 + LIPSCHITZ_REL_SLACK)

    def global_rows(self, network: Network, norm: Norm, rows: np.ndarray) -> np.ndarray:
        """Global Lipschitz bounds of each row (products of layer norms, `lipverify.norms`)."""
        key = network.fingerprint
        if key not in self._layer_bounds:  # the same per-layer bounds serve both norms
            try:
                with _one_blas_thread():
                    self._layer_bounds[key] = tuple(layer_bound(x) for x in network.layers)
            except LipverifyError as exc:
                log.info("no global bound for local: %s", exc)
                self._layer_bounds[key] = None
        per_layer = self._layer_bounds[key]
        bounds = None if per_layer is None else network_bounds(
            network.layers, network.input_size, network.num_outputs, norm, bounds=per_layer)
        flat = rows.reshape(-1, rows.shape[-1])
        if bounds is None or not len(flat):
            return np.full(rows.shape[:-1], np.inf)
        distinct, inverse = np.unique(flat, axis=0, return_inverse=True)
        values = np.array([bounds.row_lipschitz(r) for r in distinct])
        return values[inverse.reshape(-1)].reshape(rows.shape[:-1])

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
        facts = CentreFacts.of(network, problem)
        region, spec, slack, violated, values, centre = (
            facts.region, facts.spec, facts.slack, facts.violated, facts.values, facts.centre)
        eps = problem.perturbation.eps

        def row_lower(index: np.ndarray, radii: np.ndarray) -> np.ndarray:
            sub = region.subset(index) if region.is_box else region.subset(index).with_eps(radii)
            return values[index] - self.deviations(network, sub, spec.c[index])

        reach = np.zeros(len(problem))  # largest radius any probe certified (see _reach)

        def margins_at(index: np.ndarray, radii: np.ndarray) -> np.ndarray:
            lower = row_lower(index, radii)
            if not region.is_box:
                got = _reach(spec.subset(index), values[index], lower, slack[index], radii)
                reach[index] = np.maximum(reach[index], got)
            return spec.subset(index).combine(lower) - slack[index]

        searchable = centre > slack
        n = len(problem)
        if deadline_passed(deadline):
            outcomes = Outcomes(centre, slack, np.full(n, np.nan), np.zeros(n),
                                np.zeros(n, bool), True, confirmed=violated)
        elif problem.want_radius and not region.is_box:
            first = np.where(searchable, first_radius(eps, n), 0.0)
            radius, at_first = bisect_radius(margins_at, first, self.options.radius_rel_tol,
                                             None, deadline)
            radius = np.maximum(radius, reach)
            late = deadline_passed(deadline)
            outcomes = Outcomes(centre, slack, np.where(first == eps, at_first, np.nan), radius,
                                (radius >= eps) & (radius > 0), late, confirmed=violated)
        else:
            rows = row_lower(np.arange(n), region.eps)
            if self.options.lipsdp_rows:
                rows = self.refine_with_lipsdp(network, region, spec, values, rows, slack)
            margin = spec.combine(rows) - slack
            smaller = 0.0 if region.is_box else _reach(spec, values, rows, slack, region.eps)
            outcomes = Outcomes(centre, slack, margin, np.where(margin > 0, eps, smaller),
                                margin > 0, confirmed=violated)
        seconds = (time.perf_counter() - start) / max(n, 1)
        return outcomes.certificates(self.name, region.centres, seconds)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """One BLAS thread for the layers' SVDs, which cannot be interrupted.

    Spinning BLAS threads collapse on shared cores: a 256x256 SVD took 0.45 s instead of 0.01 s.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")
