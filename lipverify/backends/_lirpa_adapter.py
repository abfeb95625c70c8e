"""auto_LiRPA behind one adapter: the only importer of auto_LiRPA (with `_lirpa_compat`).

`LirpaAdapter` wraps one network: it translates lipverify's regions into `PerturbationLpNorm`s
(per-input radii included), maps `Method` to auto_LiRPA's names, splits batches to fit a memory
budget, stops at deadlines, and returns NumPy lower bounds on property rows `C y` and
pre-activation bounds. The `lirpa`, `alpha-crown` and `local` backends build on it.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import io
import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lipverify.backends._lirpa_compat import (
    lirpa_extensions,
    quiet_lirpa,
)
from lipverify.backends._margin_search import (
    Region,
    run_in_chunks,
)
from lipverify.backends.base import BackendOptions
from lipverify.errors import (
    InputError,
    ModelError,
    ResourceError,
)
from lipverify.network.layers import Activation
from lipverify.network.network import Network
from lipverify.network.rounding import sound_outputs
from lipverify.network.torchify import has_asymmetric_padding, layers_to_module, needs_matrix_mode
from lipverify.types import Norm, deadline_passed

log = logging.getLogger(__name__)

# auto_LiRPA computes in float64: in float32 a bias of 2**24 rounds away whole inputs, and
# CROWN's constant terms with it (verified margins of -0.03 on such nets).
DTYPE = torch.float64
# alpha-CROWN optimises its slopes in float32 (1.4-2.4x faster on CPU) on a float32 twin of the
# module; the bound itself is then one float64 CROWN pass with those slopes. Any slope in the
# relaxation's range gives a valid bound, so rounding in the search costs tightness, never
# soundness.
SEARCH_DTYPE = torch.float32
SLOPE_STATE = ("patch_size", "alpha_lookup_idx", "alpha_indices")
# Bytes auto_LiRPA keeps per input and per (spec row x input feature) of the widest
# back-substitution (lower and upper A matrices plus temporaries), and the extra for alpha-CROWN
# (the alphas, their gradients and Adam's moments).
BYTES_PER_ENTRY = 8 * 8
ALPHA_MEMORY_FACTOR = 4
# A rebuilt module must reproduce the network's outputs to this relative accuracy.
REBUILD_REL_TOL = 1e-4
# Radius of the trial bounds that check a bounded module works.
TRIAL_EPS = 1e-3


class OutOfTime(ResourceError):
    """The deadline passed while an adapter was being built (not a verdict on the network)."""


class Method(enum.Enum):
    """Bound propagation method; the values are auto_LiRPA's names (mapped only here)."""

    IBP = "IBP"
    CROWN = "CROWN"
    ALPHA_CROWN = "alpha-CROWN"


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class LirpaOptions(BackendOptions):
    """Options of the auto_LiRPA backends (`help` metadata documents each for configs)."""

    method: str | None = _help(None, "Bound method: IBP, CROWN or alpha-CROWN (empty: the "
                                     "backend's own).")
    batch_size: int = _help(512, "Most inputs per auto_LiRPA call.")
    memory_budget_gb: float = _help(2.0, "Memory one call may use; larger batches are split.")
    radius_rel_tol: float = _help(0.01, "Relative width of the bracket a radius search stops at.")
    alpha_iterations: int = _help(20, "Optimisation steps of alpha-CROWN.")
    alpha_lr: float = _help(0.5, "Learning rate of the alpha optimisation.")
    sparse_intermediate: bool = _help(False, "Use auto_LiRPA's sparse intermediate bounds: "
                                             "faster on convnets, but an input's bound then "
                                             "depends on the rest of its batch.")


def mishandled_modules(module: torch.nn.Module) -> str | None:
    """Why auto_LiRPA 0.3 would bound `module` wrongly as it stands, or None.

    Its average pooling back-substitutes as if stride == kernel and no padding (it upsamples the
    A matrix and pads at the end): with padding or overlapping windows the bounds are not
    bounds (14 of 27 "verified" wrong in one sweep). The layer view turns average pooling into
    an exact depthwise convolution, which auto_LiRPA bounds correctly.
    """
    for name, sub in module.named_modules():
        if isinstance(sub, (torch.nn.AvgPool1d, torch.nn.AvgPool2d, torch.nn.AvgPool3d,
                            torch.nn.AdaptiveAvgPool1d, torch.nn.AdaptiveAvgPool2d,
                            torch.nn.AdaptiveAvgPool3d)):
            return (f"{name} ({type(sub).__name__}): auto_LiRPA 0.3 bounds average pooling "
                    "wrongly; bounded as a depthwise convolution from the layer view instead")
    return None


def _concave_reason(slope: float) -> str:
    return (f"LeakyReLU with negative_slope {slope:g} > 1 is concave; auto_LiRPA 0.3 relaxes "
            "it as if convex (its bounds would not hold): use spectral or lipsdp")


def concave_activation(network: Network) -> str | None:
    """Why auto_LiRPA cannot bound `network`'s activations soundly (LeakyReLU slope > 1), or None.

    auto_LiRPA's LeakyReLU relaxation (chord above, a line through 0 below) is valid only for
    the convex case, negative_slope <= 1.
    """
    slopes = [float(m.negative_slope) for m in network.module.modules()
              if isinstance(m, torch.nn.LeakyReLU)]
    slopes += [float(layer.param) for layer in network.layers or ()
               if isinstance(layer, Activation) and layer.kind == "leaky_relu"]
    worst = max(slopes, default=0.0)
    return _concave_reason(worst) if worst > 1 else None


def parse_method(value: str | Method | None, default: Method) -> Method:
    """The `Method` an option names (`default` when empty)."""
    if value is None or value == "":
        return default
    if isinstance(value, Method):
        return value
    for method in Method:
        if str(value).lower() in (method.value.lower(), method.name.lower()):
            return method
    raise InputError(f"unknown bound method {value!r}: use one of "
                     f"{', '.join(m.value for m in Method)}")


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LirpaAdapter:
    """auto_LiRPA around one network.

    Args:
        network: The network to bound.
        options: Batch size, memory budget and alpha-CROWN settings.
        method: The method the adapter must handle (its trial bounds use it).
        use_layers: Bound the module rebuilt from the layer view (activations then match the
            layer view one to one); otherwise the original module, rebuilt only if it fails.
        deadline: A `time.monotonic()` instant; the trial bounds stop there with `OutOfTime`.
    """

    def __init__(self, network: Network, options: LirpaOptions, use_layers: bool = False,
                 method: Method = Method.CROWN, deadline: float | None = None) -> None:
        ext = lirpa_extensions()
        self.method = method
        self._ext = ext
        self.options = options
        self.network = network
        self.device = default_device()
        self._deadline = deadline
        self._search: Any = None  # the float32 twin alpha-CROWN searches slopes on (lazy)
        self._search_failed = False
        self.bounded, self.source = self._build(network, use_layers)
        self._deadline = None

    def _build(self, network: Network, use_layers: bool) -> tuple[Any, str]:
        concave = concave_activation(network)
        if concave:
            raise ModelError(concave)
        reasons = []
        candidates: list[tuple[str, Callable[[], torch.nn.Module]]] = []
        wrong = mishandled_modules(network.module)
        if wrong:
            reasons.append(f"module: {wrong}")
        elif not use_layers and not isinstance(network.module, torch.fx.GraphModule):
            candidates.append(("module", lambda: copy.deepcopy(network.module)))
        if network.layers is not None:
            if has_asymmetric_padding(network.layers):
                reasons.append("layers: asymmetric padding (auto_LiRPA 0.3 cannot bound ZeroPad2d)")
            else:
                candidates.append(("layers", lambda: layers_to_module(network.layers,
                                                                      network.input_shape)))
        elif use_layers:
            reasons.append(f"no layer view ({network.unsupported})")
        matrix = network.layers is not None and needs_matrix_mode(network.layers)
        # Sparse alphas crash 0.3 on convnets; per-position conv alphas cost 4x for nothing.
        opts = {"conv_mode": "matrix" if matrix else "patches", "sparse_features_alpha": False,
                "sparse_spec_alpha": False, "use_full_conv_alpha": False,
                "sparse_intermediate_bounds": self.options.sparse_intermediate,
                "sparse_conv_intermediate_bounds": self.options.sparse_intermediate}
        for source, make in candidates:
            try:
                with quiet_lirpa(), default_dtype(DTYPE):
                    module = make().eval().to(self.device)
                    self._make_search = self._twin_maker(module, opts)
                    dummy = torch.zeros((1, *network.input_shape), dtype=DTYPE, device=self.device)
                    self.bounded = self._ext.Bounded(module.to(DTYPE), dummy,
                                                     bound_opts=dict(opts), device=self.device)
                    ops = self._ext.lirpa.bound_ops
                    kinds = (ops.BoundRelu, ops.BoundLeakyRelu, ops.BoundTanh)  # sigmoid: a tanh
                    self.activations = [n for n in self.bounded._modules.values()
                                        if isinstance(n, kinds)]
                    for node in self.activations:  # a functional leaky_relu the views missed
                        if isinstance(node, ops.BoundLeakyRelu) and float(node.alpha) > 1:
                            raise ModelError(_concave_reason(float(node.alpha)))
                    self._entries = self._widest_entries()
                    self._check_forward(network)
                    self._trial(network)
                return self.bounded, source
            except OutOfTime:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is a reason to report
                reasons.append(f"{source}: {type(exc).__name__}: {exc}".splitlines()[0])
        raise ModelError("auto_LiRPA cannot bound this network: " + "; ".join(reasons))

    def _twin_maker(self, module: torch.nn.Module, opts: dict) -> Callable[[], Any]:
        """A builder of the float32 bounded twin of `module` (copied now, built on first use)."""
        twin = copy.deepcopy(module).to(SEARCH_DTYPE)

        def make() -> Any:
            with quiet_lirpa(), default_dtype(SEARCH_DTYPE):
                dummy = torch.zeros((1, *self.network.input_shape), dtype=SEARCH_DTYPE,
                                    device=self.device)
                return self._ext.Bounded(twin, dummy, bound_opts=dict(opts), device=self.device)
        return make

    @property
    def slope_search_dtype(self) -> torch.dtype:
        """The precision alpha-CROWN's slopes were last searched in (bounds are always float64)."""
        return DTYPE if self._search is None or self._search_failed else SEARCH_DTYPE

    def _search_twin(self) -> Any:
        """The float32 twin, or None when it cannot be built (then alpha-CROWN runs in float64)."""
        if self._search is None and not self._search_failed:
            try:
                self._search = self._make_search()
            except Exception as exc:  # noqa: BLE001 - the float64 path still works
                log.info("float32 slope search unavailable (%s): alpha-CROWN runs in float64",
                         f"{type(exc).__name__}: {exc}".splitlines()[0])
                self._search_failed = True
        return None if self._search_failed else self._search

    def _trial(self, network: Network) -> None:
        """Bounds on two probe inputs under each norm, one and per-input radii, by CROWN (and
        alpha-CROWN when asked for): some operations build fine and fail only when bounded."""
        probe = np.random.default_rng(0).random((2, *network.input_shape))
        c = np.eye(network.num_outputs)[None, :1].repeat(2, axis=0)
        methods = {Method.CROWN, self.method}
        linf = Region(probe, Norm.LINF, np.full(2, TRIAL_EPS))
        l2 = Region(probe, Norm.L2, np.full(2, TRIAL_EPS))
        # Per-input L-inf radii are boxes, the same path as one radius; per-input L2 is not.
        regions = (linf, l2, l2.with_eps(np.array([TRIAL_EPS, 2 * TRIAL_EPS])))
        for region, method in itertools.product(regions, sorted(methods, key=str)):
            if deadline_passed(self._deadline):
                raise OutOfTime("out of time while preparing auto_LiRPA's bounds")
            lower = self.row_bounds(region, c, method, iterations=2)
            if not np.all(np.isfinite(lower)):
                raise ModelError(f"non-finite {method.value} bounds on a probe input")

    def _check_forward(self, network: Network) -> None:
        probe = torch.rand((4, *network.input_shape), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = self.bounded(probe.to(DTYPE).to(self.device)).reshape(4, -1).double().cpu().numpy()
        want = sound_outputs(network, probe.numpy()).values
        scale = 1.0 + np.abs(want).max()
        if got.shape != want.shape or np.abs(got - want).max() > REBUILD_REL_TOL * scale:
            raise ModelError("the bounded module does not reproduce the network's outputs")

    def _widest_entries(self) -> int:
        sizes = [math.prod(self.network.input_shape)]
        total = 0
        for node in self.activations:
            shape = getattr(node.inputs[0], "output_shape", None)
            width = math.prod(shape[1:]) if shape is not None else sizes[-1]
            total += width * max(sizes)
            sizes.append(width)
        return total + self.network.num_outputs * max(sizes)

    def chunk_size(self, method: Method) -> int:
        """Inputs per call that fit the memory budget (and the batch size)."""
        per_input = BYTES_PER_ENTRY * self._entries
        if method == Method.ALPHA_CROWN:
            per_input *= ALPHA_MEMORY_FACTOR
        fits = int(self.options.memory_budget_gb * 2 ** 30 // max(per_input, 1))
        return max(1, min(self.options.batch_size, fits))

    def _bounded_tensor(self, region: Region, dtype: torch.dtype = DTYPE) -> Any:
        ext = self._ext
        x = torch.as_tensor(region.centres, dtype=dtype, device=self.device)
        x = x.reshape((len(region), *self.network.input_shape))
        if region.is_box:
            lo, hi = (torch.as_tensor(a, dtype=dtype, device=self.device).reshape(x.shape)
                      for a in (region.lower, region.upper))
            ptb = ext.lirpa.PerturbationLpNorm(norm=np.inf, eps=float(region.eps.max()),
                                               x_L=lo, x_U=hi)
        elif region.uniform:
            norm = np.inf if region.norm == Norm.LINF else 2
            ptb = ext.lirpa.PerturbationLpNorm(norm=norm, eps=float(region.eps[0]))
        elif region.norm == Norm.LINF:
            eps = torch.as_tensor(region.eps, dtype=dtype, device=self.device)
            eps = eps.view(-1, *([1] * (x.dim() - 1)))
            ptb = ext.lirpa.PerturbationLpNorm(norm=np.inf, eps=float(region.eps.max()),
                                               x_L=x - eps, x_U=x + eps)
        else:
            eps = torch.as_tensor(region.eps, dtype=dtype, device=self.device)
            ptb = ext.PerInputLpNorm(norm=2, eps=eps.view(-1, 1))
        return ext.lirpa.BoundedTensor(x, ptb)

    def _configure(self, method: Method, region: Region, deadline: float | None = None) -> None:
        # Sparse intermediate bounds take reference bounds from interval arithmetic, which
        # auto_LiRPA computes for convolutions with a scalar L2 radius only.
        per_input_l2 = not region.uniform and not region.is_box and region.norm == Norm.L2
        self.bounded.bound_opts["sparse_intermediate_bounds_with_ibp"] = not per_input_l2
        if method == Method.ALPHA_CROWN:
            self.bounded.set_bound_opts({"optimize_bound_args": {
                "iteration": self.options.alpha_iterations, "lr_alpha": self.options.alpha_lr,
                "stop_criterion_func": _stop_at(deadline)}})

    def _bounds(self, x: Any, method: Method, **kwargs: Any) -> Any:
        grad = torch.enable_grad() if method == Method.ALPHA_CROWN else torch.no_grad()
        # alpha-CROWN prints its early stops ("all verified at ...") on stdout: keep it clean.
        with grad, contextlib.redirect_stdout(io.StringIO()), default_dtype(DTYPE):
            return self.bounded.compute_bounds(x=(x,), method=method.value, **kwargs)

    def row_bounds(self, region: Region, c: np.ndarray, method: Method,
                   iterations: int | None = None, deadline: float | None = None) -> np.ndarray:
        """Lower bounds of `C y` over each input's region (shape `(B, rows)`, float64).

        `iterations` overrides the alpha-CROWN steps (the trial bounds use two). Past
        `deadline` (`time.monotonic()`), alpha-CROWN stops optimising and returns the best
        bounds so far (every iterate's bound is sound).
        """
        if c.shape[1] == 0:
            return np.zeros((len(region), 0))
        if method == Method.IBP and region.norm == Norm.L2 and not region.uniform:
            # auto_LiRPA's interval bounds of a convolution take one scalar L2 radius: one call
            # per input (interval arithmetic is cheap).
            return np.concatenate([self.row_bounds(
                Region(region.centres[i:i + 1], Norm.L2, region.eps[i:i + 1]), c[i:i + 1],
                method) for i in range(len(region))])
        self._configure(method, region, deadline)
        if iterations is not None and method == Method.ALPHA_CROWN:
            self.bounded.set_bound_opts({"optimize_bound_args": {"iteration": iterations}})

        def run(index: np.ndarray) -> np.ndarray:
            x = self._bounded_tensor(region.subset(index))
            cm = torch.as_tensor(c[index], dtype=DTYPE, device=self.device)
            if method == Method.ALPHA_CROWN and self._search_slopes(region.subset(index), cm):
                # Both bounds are sound: CROWN's (one more cheap pass) covers the rows where the
                # slopes, chosen for the sum of rows, lost ground.
                lower, _ = self._bounds(x, Method.CROWN, C=cm, bound_upper=False,
                                        reuse_alpha=True)
                crown, _ = self._bounds(x, Method.CROWN, C=cm, bound_upper=False)
                lower = torch.maximum(lower, crown)
            else:
                lower, _ = self._bounds(x, method, C=cm, bound_upper=False)
            return lower.detach().double().cpu().numpy()

        return run_in_chunks(run, len(region), self.chunk_size(method), self.device)

    def input_coefficients(self, region: Region, c: np.ndarray) -> np.ndarray:
        """CROWN's lower-bound coefficients of `C y` on the input, `(B, rows, n)` float64.

        Row `r`'s bound is `a_r . x + const` for every `x` in the region, so its minimiser over
        the region (a box vertex, or the ball's point along `-a_r`) is where that row is most
        likely violated: a falsifier's candidate, never part of a proof.
        """
        self._configure(Method.CROWN, region)
        out, inp = self.bounded.output_name[0], self.bounded.input_name[0]

        def run(index: np.ndarray) -> np.ndarray:
            x = self._bounded_tensor(region.subset(index))
            cm = torch.as_tensor(c[index], dtype=DTYPE, device=self.device)
            _, _, a = self._bounds(x, Method.CROWN, C=cm, bound_upper=False, return_A=True,
                                   needed_A_dict={out: [inp]})
            return a[out][inp]["lA"].reshape(len(index), c.shape[1], -1).double().cpu().numpy()

        return run_in_chunks(run, len(region), self.chunk_size(Method.CROWN), self.device)

    def _search_slopes(self, region: Region, cm: torch.Tensor) -> bool:
        """Optimise alpha-CROWN's slopes on the float32 twin and hand them to the float64 module.

        False (nothing handed over) when the twin is unavailable or its slopes do not fit.
        """
        twin = self._search_twin()
        if twin is None:
            return False
        twin.bound_opts["sparse_intermediate_bounds_with_ibp"] = \
            self.bounded.bound_opts["sparse_intermediate_bounds_with_ibp"]
        twin.set_bound_opts({"optimize_bound_args": dict(
            self.bounded.bound_opts["optimize_bound_args"])})
        x = self._bounded_tensor(region, SEARCH_DTYPE)
        try:
            with torch.enable_grad(), contextlib.redirect_stdout(io.StringIO()), \
                    default_dtype(SEARCH_DTYPE):
                twin.compute_bounds(x=(x,), method=Method.ALPHA_CROWN.value,
                                    C=cm.to(SEARCH_DTYPE), bound_upper=False)
            found = {n.name: n for n in twin.optimizable_activations}
            if not all(torch.isfinite(v).all() for n in found.values() for v in n.alpha.values()):
                return False  # float32 overflowed on this region: this call runs in float64
            for node in self.bounded.optimizable_activations:
                source = found[node.name]
                node.alpha = OrderedDict((k, v.detach().to(DTYPE))
                                         for k, v in source.alpha.items())
                for attr in SLOPE_STATE:  # what auto_LiRPA's reuse stage reads beside alpha
                    if hasattr(source, attr):
                        setattr(node, attr, copy.copy(getattr(source, attr)))
        except (AttributeError, KeyError, RuntimeError) as exc:
            log.info("float32 slopes not usable (%s): alpha-CROWN runs in float64",
                     f"{type(exc).__name__}: {exc}".splitlines()[0])
            self._search_failed = True
            return False
        return True

    def _node_bounds(self, batch: int, relu_bounds: list[tuple[torch.Tensor, torch.Tensor]]
                     ) -> dict[str, list[torch.Tensor]]:
        """Flat per-activation input bounds as auto_LiRPA takes them: by the name of each
        activation's input node, in network order, reshaped to that node's shape."""
        out = {}
        for node, (lower, upper) in zip(self.activations, relu_bounds, strict=True):
            pre = node.inputs[0]
            shape = (batch, *pre.output_shape[1:])
            out[pre.name] = [lower.reshape(shape), upper.reshape(shape)]
        return out

    def split_bounds(self, region: Region, c: torch.Tensor,
                     relu_bounds: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                     ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]],
                                list[torch.Tensor]]:
        """CROWN bounds of `C y` (`(B, rows)`) on sub-domains given by activation bounds.

        `relu_bounds` holds per activation `(lower, upper)` of its input, shaped `(B, n)`, for
        each of the `B` regions: bounds known to hold there (a parent's, with a branch's split
        neurons clamped at 0). The first activation's are used as they are (its bounds do not
        depend on later layers, and auto_LiRPA would not intersect them); later ones are
        recomputed and intersected with these. Returns the row lower bounds, the new activation
        input bounds (flattened, `(B, n)`), and per activation the coefficients of the rows on
        its output (`(rows, B, n)`, for branching scores). Batches are not split: callers size
        them.
        """
        self._configure(Method.CROWN, region)
        x = self._bounded_tensor(region)
        known = self._node_bounds(len(region), relu_bounds) if relu_bounds is not None else {}
        names = list(known)
        fixed = {name: known[name] for name in names[:1]}
        reference = {name: known[name] for name in names[1:]}
        # Later layers' bounds are recomputed by CROWN only where interval arithmetic leaves a
        # neuron unstable (auto_LiRPA's sparse intermediate bounds, 4-5x faster on MLPs; with
        # the known bounds as its reference instead, it was slower and looser).
        opts = self.bounded.bound_opts
        before = opts["sparse_intermediate_bounds"]
        opts["sparse_intermediate_bounds"] = bool(reference)
        try:
            lower, _ = self._bounds(x, Method.CROWN, C=c.to(DTYPE), bound_upper=False,
                                   intermediate_layer_bounds=fixed or None,
                                   reference_bounds=reference or None)
        finally:
            opts["sparse_intermediate_bounds"] = before
        bounds, coeffs = [], []
        for node in self.activations:
            pre = node.inputs[0]
            bounds.append((pre.lower.detach().reshape(len(region), -1),
                           pre.upper.detach().reshape(len(region), -1)))
            coeffs.append(node.lA.detach().reshape(c.shape[1], len(region), -1))
        return lower.detach(), bounds, coeffs

    def beta_bounds(self, region: Region, c: torch.Tensor,
                    relu_bounds: list[tuple[torch.Tensor, torch.Tensor]],
                    splits: list[tuple[torch.Tensor, torch.Tensor]], iterations: int,
                    deadline: float | None = None) -> torch.Tensor:
        """beta-CROWN lower bounds of `C y` (`(B, rows)`) on sub-domains (Wang et al. 2021).

        Every activation's input bounds are fixed to `relu_bounds` (`(B, n)` each, known to
        hold on the sub-domain); `splits[k]` holds the sub-domain's split constraints on
        activation `k` as `(index, sign)` (`(B, S)`, `S >= 1`: `sign * z[index] >= 0`, sign 0
        pads; auto_LiRPA needs them on every activation).
        Each constraint enters the bound with a multiplier `beta >= 0`, optimised with the
        last layer's slopes by auto_LiRPA; every iterate's bound is sound (a Lagrangian
        relaxation), and the best one is kept.
        """
        self._configure(Method.CROWN, region)
        x = self._bounded_tensor(region)
        fixed = self._node_bounds(len(region), relu_bounds)
        args = self.bounded.bound_opts["optimize_bound_args"]
        saved = dict(args)
        args.update({"enable_alpha_crown": True, "enable_beta_crown": True,
                     "iteration": iterations, "init_alpha": False, "lr_alpha": 0.1,
                     "lr_beta": 0.05, "fix_intermediate_layer_bounds": True,
                     "stop_criterion_func": _stop_when_proven(deadline)})
        c = c.to(DTYPE)
        try:
            for node, (index, sign) in zip(self.activations, splits, strict=True):
                node.sparse_beta_loc = index
                node.sparse_beta_sign = sign.to(DTYPE)
                node.sparse_beta = torch.zeros(sign.shape, dtype=DTYPE, device=self.device,
                                               requires_grad=True)
            with torch.enable_grad(), contextlib.redirect_stdout(io.StringIO()), \
                    default_dtype(DTYPE):
                self.bounded.init_slope((x,), method="backward", c=c, bound_upper=False,
                                        intermediate_layer_bounds=fixed)
                lower, _ = self.bounded.compute_bounds(
                    x=(x,), method=Method.ALPHA_CROWN.value, C=c, bound_upper=False,
                    intermediate_layer_bounds=fixed)
        finally:
            for node in self.activations:
                node.sparse_beta = node.sparse_beta_loc = node.sparse_beta_sign = None
            args.update(saved)
        return lower.detach()

    def preactivation_bounds(self, region: Region) -> list[tuple[np.ndarray, np.ndarray]]:
        """CROWN bounds on the input of every activation, in network order.

        Each pair holds lower and upper bounds shaped `(B, features)` (float64).
        """
        if not self.activations:
            return []
        self._configure(Method.CROWN, region)

        def run(index: np.ndarray) -> np.ndarray:
            # Bounding the whole output fills every pre-activation on the way (stopping at the
            # last pre-activation fails when that is a convolution in patches mode).
            x = self._bounded_tensor(region.subset(index))
            self._bounds(x, Method.CROWN, bound_upper=False)
            flat = [torch.cat([a.inputs[0].lower.reshape(len(index), -1),
                               a.inputs[0].upper.reshape(len(index), -1)], dim=1)
                    for a in self.activations]
            return torch.cat(flat, dim=1).double().cpu().numpy()

        packed = run_in_chunks(run, len(region), self.chunk_size(Method.CROWN), self.device)
        out = []
        offset = 0
        for act in self.activations:
            width = math.prod(act.inputs[0].output_shape[1:])
            out.append((packed[:, offset:offset + width],
                        packed[:, offset + width:offset + 2 * width]))
            offset += 2 * width
        return out


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to `dtype` inside the block (restored after).

    alpha-CROWN casts its best bounds to the default dtype in its last step: under float32 it
    would round float64 bounds to float32 (up as often as down) and then fail on mixed dtypes.
    """
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _stop_at(deadline: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """auto_LiRPA's alpha-CROWN stop criterion: every bound "done" once `deadline` passed."""
    def stop(lower: torch.Tensor) -> torch.Tensor:
        late = deadline_passed(deadline)
        return torch.full_like(lower, late, dtype=torch.bool)

    return stop


def _stop_when_proven(deadline: float | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """beta-CROWN's stop criterion: a bound is done once positive, all once `deadline` passed."""
    def stop(lower: torch.Tensor) -> torch.Tensor:
        return (lower > 0) | deadline_passed(deadline)

    return stop
