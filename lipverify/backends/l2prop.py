"""`l2prop`: L2-aware linear bound propagation with the coupled (SDP-CROWN style) ReLU offset.

Chiu, Chen, Zhang, Zhang, "SDP-CROWN: Efficient bound propagation for neural network
verification with tightness of semidefinite programming", ICML 2025, arXiv 2506.06665.
The derivation, with every inequality and the floating-point allowance, is in `docs/l2prop.md`
and the docstrings of `lipverify.bounds`.

What it proves: lower bounds of every property row `c . f(x)` over the whole L2 ball
`||x - x0|| <= eps` (sound, local), hence `verified` when each property term has a row with
positive margin; with `want_radius`, the largest radius so proven (bisection). Feed-forward ReLU
networks only (Dense, Conv, Shift, Reshape between ReLUs). Cost: one backward pass per neuron
for intermediate bounds plus `iterations` passes for the slopes; a few seconds per input on CPU.

Example:
    >>> from lipverify.backends.l2prop import L2PropBackend
    >>> L2PropBackend().name
    'l2prop'
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lipverify.backends._margin_search import deadline_of
from lipverify.backends.base import BackendBase, BackendOptions
from lipverify.bounds.certify import RowSet, lower_bounds, margin_lower
from lipverify.bounds.chain import Chain, build_chain
from lipverify.bounds.intermediate import (
    DEFAULT_PROPAGATION_BUDGET,
    DEFAULT_ROW_CHUNK,
    IntermediateOptions,
)
from lipverify.bounds.operator import BlockNorms, block_norms
from lipverify.bounds.optimise import DEFAULT_ITERATIONS, DEFAULT_LR, DEFAULT_LR_DECAY
from lipverify.errors import InputError, ModelError
from lipverify.network.network import Network
from lipverify.types import Certificate, Norm, Problem, Scope, Status, deadline_passed

log = logging.getLogger(__name__)

DEFAULT_BATCH = 16
DEFAULT_RADIUS_STEPS = 8
# How far above eps the radius search looks (factor of eps), when the input verifies at eps.
RADIUS_GROWTH = 2.0
RADIUS_MAX_GROWTHS = 4


@dataclass(frozen=True)
class L2PropOptions(BackendOptions):
    """Options of the `l2prop` backend.

    Attributes:
        iterations: Adam steps on the lower slopes (0 keeps CROWN's slopes).
        lr: Learning rate of the slopes.
        lr_decay: Per-step learning-rate decay factor.
        batch_size: Inputs bounded together.
        crown_layers: ReLU layers (after the first) whose intermediate bounds use backward
            propagation as well as Lipschitz intervals; None for all.
        propagation_budget: Per-layer cost cap (rows x earlier unstable neurons) above which
            intermediate bounds use the Lipschitz interval only; None for no cap.
        intermediate_iterations: Slope optimisation steps for propagated intermediate bounds.
        escalate: Inputs the first pass does not verify at eps get a second pass whose
            intermediate bounds are propagated on every layer (no `propagation_budget`); the
            better of the two sound bounds is kept. Costs ~5-8x per escalated input on convnets.
        row_chunk: Objective rows per backward pass of intermediate bounds (memory).
        radius_steps: Bisection steps of the certified-radius search.
        device: Torch device; None picks CUDA when available, else CPU.
    """

    iterations: int = DEFAULT_ITERATIONS
    lr: float = DEFAULT_LR
    lr_decay: float = DEFAULT_LR_DECAY
    batch_size: int = DEFAULT_BATCH
    crown_layers: int | None = None
    propagation_budget: int | None = DEFAULT_PROPAGATION_BUDGET
    intermediate_iterations: int = 0
    escalate: bool = True
    row_chunk: int = DEFAULT_ROW_CHUNK
    radius_steps: int = DEFAULT_RADIUS_STEPS
    device: str | None = None


@dataclass
class _Prepared:
    chain: Chain
    norms: BlockNorms


class L2PropBackend(BackendBase):
    """Backward bound propagation over an L2 ball with SDP-CROWN's coupled ReLU offset.

    Paper: Chiu et al., ICML 2025, https://arxiv.org/abs/2506.06665. Sound lower bounds of
    property margins on the L2 ball (local scope); ReLU feed-forward networks; cost 40.

    Args:
        options: `L2PropOptions`.
    """

    name: ClassVar[str] = "l2prop"
    cost: ClassVar[int] = 40
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2})
    scopes: ClassVar[frozenset[Scope]] = frozenset({Scope.LOCAL})
    sound: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = L2PropOptions

    def __init__(self, options: L2PropOptions | None = None) -> None:
        super().__init__(options)
        self._prepared: dict[str, _Prepared] = {}  # per weight fingerprint, this instance only

    def supports(self, network: Network, problem: Problem) -> str | None:
        """None when `network` is a ReLU chain and the problem an L2 ball, else why not."""
        why = super().supports(network, problem)
        if why:
            return why
        if problem.perturbation.is_box:
            return "l2prop handles L2 balls, not boxes"
        if network.layers is None:
            return f"no layer view ({network.unsupported or 'unsupported layer'})"
        try:
            build_chain(network.layers, network.input_shape)
        except ModelError as exc:
            return str(exc)
        return None

    def _prepare(self, network: Network) -> _Prepared:
        key = network.fingerprint
        if key not in self._prepared:
            chain = build_chain(network.require_layers(), network.input_shape)
            self._prepared[key] = _Prepared(chain, block_norms(chain))
        return self._prepared[key]

    def _device(self) -> torch.device:
        if self.options.device is not None:
            return torch.device(self.options.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def margins(self, network: Network, problem: Problem, eps: np.ndarray,
                deadline: float | None = None, escalate: bool = False) -> np.ndarray:
        """Sound lower bounds of each input's property margin at per-input radii `eps`.

        Past `deadline` (`time.monotonic()`) the slope optimisation stops early and batches not
        started get `-inf` (no bound). With `escalate` (and the option), inputs left without a
        positive margin get the second, unbudgeted pass (see `L2PropOptions.escalate`).
        """
        opts = self.options
        inter = IntermediateOptions(crown_layers=opts.crown_layers,
                                    budget=opts.propagation_budget, row_chunk=opts.row_chunk,
                                    iterations=opts.intermediate_iterations)
        out = self._pass(network, problem, eps, inter, deadline)
        failing = np.flatnonzero(~(out > 0))
        if escalate and opts.escalate and inter.budget is not None and len(failing) \
                and not deadline_passed(deadline):
            full = dataclasses.replace(inter, budget=None)
            again = self._pass(network, problem.subset(failing), eps[failing], full, deadline)
            log.info("l2prop: escalated %d inputs, %d now verified", len(failing),
                     int((again > 0).sum()))
            out[failing] = np.maximum(out[failing], again)
        return out

    def _pass(self, network: Network, problem: Problem, eps: np.ndarray,
              inter: IntermediateOptions, deadline: float | None) -> np.ndarray:
        """One bounding pass over `problem` in batches (see `margins`)."""
        prep = self._prepare(network)
        opts = self.options
        out = np.empty(len(problem))
        device = self._device()
        torch.manual_seed(opts.seed)
        for start in range(0, len(problem), opts.batch_size):
            idx = np.arange(start, min(start + opts.batch_size, len(problem)))
            if deadline_passed(deadline):
                out[idx] = -np.inf
                continue
            rowset = RowSet.from_properties([problem.properties[i] for i in idx])
            x0 = torch.as_tensor(np.asarray(problem.inputs[idx]), dtype=torch.float64,
                                 device=device)
            rho = torch.as_tensor(eps[idx], dtype=torch.float64, device=device)
            outputs = network.forward(problem.inputs[idx])
            res = lower_bounds(prep.chain, prep.norms, x0, rho, rowset, inter, opts, deadline)
            out[idx] = margin_lower(rowset, res, outputs)
        return out

    def certify(self, network: Network, problem: Problem) -> list[Certificate]:
        """One certificate per input: verified when every margin is provably positive.

        Stops at the problem's deadline or `timeout`: what is not verified by then is `timeout`.

        Raises:
            InputError: the problem is not an L2 ball (the bounds hold on L2 balls only; called
                directly, without `supports`, it would otherwise certify the wrong set).
        """
        if problem.perturbation.norm != Norm.L2 or problem.perturbation.is_box:
            raise InputError("l2prop bounds L2 balls only, not L-inf balls or boxes")
        start = time.perf_counter()
        deadline = deadline_of(problem, self.options.timeout)
        eps = problem.perturbation.eps
        margins = self.margins(network, problem, np.full(len(problem), eps), deadline,
                               escalate=True)
        radii = np.where(margins > 0, eps, 0.0)
        if problem.want_radius:
            radii = self._radii(network, problem, margins, deadline)
        late = deadline_passed(deadline)
        per = (time.perf_counter() - start) / max(len(problem), 1)
        certs = []
        for m, r in zip(margins, radii, strict=True):
            status = Status.VERIFIED if m > 0 and eps > 0 else \
                Status.TIMEOUT if late else Status.UNKNOWN
            if eps == 0 and m > 0:
                status = Status.VERIFIED
            certs.append(Certificate(status, self.name, float(r), float(m), per,
                                     details={"eps": eps}))
        return certs

    def _radii(self, network: Network, problem: Problem, at_eps: np.ndarray,
               deadline: float | None = None) -> np.ndarray:
        """Largest radius proven per input: grow past eps while it verifies, then bisect.

        Stops at `deadline`, keeping the largest radius proven so far.
        """
        eps = problem.perturbation.eps
        lo = np.where(at_eps > 0, eps, 0.0)
        hi = np.where(at_eps > 0, eps * RADIUS_GROWTH, eps if eps > 0 else 1.0)
        growing = np.flatnonzero(at_eps > 0)
        for _ in range(RADIUS_MAX_GROWTHS):
            if not len(growing) or deadline_passed(deadline):
                break
            ok = self.margins(network, problem.subset(growing), hi[growing], deadline) > 0
            lo[growing[ok]] = hi[growing[ok]]
            hi[growing[ok]] *= RADIUS_GROWTH
            growing = growing[ok]
        for _ in range(self.options.radius_steps):
            if deadline_passed(deadline):
                break
            mid = (lo + hi) / 2
            ok = self.margins(network, problem, mid, deadline) > 0
            lo = np.where(ok, mid, lo)
            hi = np.where(ok, hi, mid)
        return lo
