"""The `lipsdp` backend: LipSDP-Neuron / LipSDP-Layer bounds per class pair and globally."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import scipy.linalg as sla

from lipverify.backends._margin_search import deadline_of
from lipverify.backends.base import BackendBase, BackendOptions
from lipverify.errors import InputError, LipverifyError, ResourceError
from lipverify.lower_bounds import LowerBoundOptions, pairwise_lower_bound, row_lower_bounds
from lipverify.margins import certificates_from_radii, margin_certificates, robust_radii
from lipverify.network.rounding import SoundOutputs, sound_outputs
from lipverify.network.network import Network
from lipverify.sdp import (
    Chain,
    Form,
    SDPBound,
    SDPOptions,
    Solver,
    Verdict,
    chain_bound,
    chain_from_layers,
    estimate,
    split_bound,
    unsupported_reason,
)
from lipverify.sdp.bound import _blas_threads as blas_threads
from lipverify.sdp.bound import round_up
from lipverify.sdp.cache import BoundCache
from lipverify.sdp.chain import power_of_two_scales, reduce_input, split_chain
from lipverify.types import Certificate, LipschitzBound, Norm, Problem, Scope, Status

log = logging.getLogger(__name__)

# Under a deadline, an SDP starts only if its set-up and float64 check (dense factorisations
# and eigenvalues, which cannot be interrupted) fit in the time left; their time is estimated
# from one timed eigenvalue problem of this size, scaled by the cube of the matrix sizes
# (conservative: larger matrices run faster per n^3).
CALIBRATION_SIZE = 256
# Random points (around and between the inputs) beside the inputs themselves when proving lower
# bounds of pair and row Lipschitz constants for pruning: at a data point a ReLU net's gradient
# can be 20x below its gradients nearby (mnist-net_256x2: 0.27 at one image, 4-8 around it).
PRUNE_RANDOM_POINTS = 64
# Before a network's first solve, an SDP's solve time is modelled as this many eigenvalue
# problems of the solved matrix's size (the structured IPM: ~20 iterations of a few dense
# products; 784-256-256-10 measured 10 s = about 50 of them). First-order and generic solvers
# take longer. After a solve, the measured seconds replace the model.
SOLVE_CUBES = {Solver.IPM: 50.0}
OTHER_SOLVER_CUBES = 500.0


@dataclass(frozen=True)
class LipSDPOptions(BackendOptions):
    """Options of the `lipsdp` backend."""

    solver: str = field(default="ipm", metadata={
        "help": "Solver: ipm (structured interior point, fast and tight), scs or clarabel "
                "(through cvxpy)."})
    form: str = field(default="neuron", metadata={
        "help": "LipSDP-Neuron (one multiplier per neuron) or LipSDP-Layer (one per layer)."})
    pairwise: bool = field(default=True, metadata={
        "help": "Bound each class-pair margin f_y - f_j by its own SDP (tighter, more solves)."})
    prune: bool = field(default=True, metadata={
        "help": "At a fixed eps, solve no pair (or property row) SDP that cannot verify: where "
                "the margin over a proven lower bound of the pair's or row's Lipschitz constant "
                "(gradient norms at the inputs, checked by difference quotients) is below eps."})
    memory_budget_gb: float = field(default=8.0, metadata={
        "help": "Refuse SDPs whose estimated memory exceeds this many GiB."})
    max_size: int = field(default=3000, metadata={
        "help": "Refuse SDPs whose matrix (after input reduction) has more rows: solve time "
                "grows as n^3 (768 rows: ~25 s; 5,600 rows, a small convnet's exact matrices: "
                "about an hour per class pair on 2 cores)."})
    split: int | None = field(default=None, metadata={
        "help": "Hidden layers per sub-network; the bound is the product of their LipSDP "
                "bounds (None: one SDP)."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Directory of the JSON bound cache (default $LIPVERIFY_CACHE_DIR or "
                "~/.cache/lipverify)."})
    tolerance: float = field(default=1e-6, metadata={
        "help": "Relative solver tolerance (the reported bound is always checked)."})
    threads: int | None = field(default=1, metadata={
        "help": "BLAS threads during solves (None leaves the library default)."})

    def sdp_options(self) -> SDPOptions:
        """The per-SDP options these backend options imply."""
        try:
            form = Form(str(self.form).lower())
        except ValueError:
            raise InputError(f"lipsdp form must be neuron or layer, got {self.form!r}") from None
        return SDPOptions(form=form, solver=Solver.parse(self.solver), tolerance=self.tolerance,
                          memory_budget_gb=self.memory_budget_gb, threads=self.threads)


class LipSDPBackend(BackendBase):
    """LipSDP: Lipschitz bounds from a semidefinite program over slope-restricted activations.

    Fazlyab, Robey, Hassani, Morari, Pappas, "Efficient and Accurate Estimation of Lipschitz
    Constants for Deep Neural Networks", NeurIPS 2019 (https://arxiv.org/abs/1906.04893).
    LipSDP-Neuron (diagonal multipliers per neuron) and LipSDP-Layer; not the coupled "Network"
    form, which is not a valid bound in general.

    Proves, for feed-forward networks with elementwise slope-restricted activations (ReLU,
    LeakyReLU, tanh, sigmoid; convolutions as their exact matrices), a sound upper bound on the
    L2 Lipschitz constant of each class-pair margin `f_y - f_j` (pairwise scope) and of the whole
    network (global scope). Every value is checked after the solver: the matrix inequality is
    verified in float64 with a rounding margin and `rho` raised until it provably holds. L-inf
    certificates use `||d||_2 <= sqrt(n) ||d||_inf`.

    Cost: one SDP of size (rank of the first weight + hidden neurons) per class pair, cached per
    network (in memory and as JSON on disk); a few seconds per SDP for hundreds of neurons,
    then one forward pass per input.

    Args:
        options: `LipSDPOptions` (solver, form, pairwise, memory_budget_gb, split, cache_dir,
            tolerance, threads).

    Example:
        >>> import torch
        >>> from lipverify.network.extract import extract_layers
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(),
        ...                           torch.nn.Linear(3, 2))
        >>> network = Network(net, (2,), 2, extract_layers(net, (2,)))
        >>> backend = LipSDPBackend(LipSDPOptions(cache_dir=None))
        >>> bound = backend.lipschitz(network, Norm.L2)
        >>> bound.sound and bound.value > 0
        True

    """

    name: ClassVar[str] = "lipsdp"
    cost: ClassVar[int] = 50
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2, Norm.LINF})
    scopes: ClassVar[frozenset[Scope]] = frozenset({Scope.GLOBAL, Scope.PAIRWISE})
    sound: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("cvxpy", "scipy", "threadpoolctl")
    Options: ClassVar[type] = LipSDPOptions

    def __init__(self, options: LipSDPOptions | None = None) -> None:
        super().__init__(options)
        self._sdp = self.options.sdp_options()
        self._caches: dict[str, BoundCache] = {}
        self._cubic_seconds: float | None = None
        # Proven lower bounds of pair / row Lipschitz constants per network fingerprint, the
        # largest seen so far (every checked gradient norm at any point is one).
        self._pair_lows: dict[str, np.ndarray] = {}
        self._row_lows: dict[tuple[str, bytes], float] = {}

    # -- what can run ------------------------------------------------------------------------
    def supports(self, network: Network, problem: Problem) -> str | None:
        """None when LipSDP applies, else why not (layer kinds, memory estimate)."""
        why = super().supports(network, problem)
        if why:
            return why
        if network.layers is None:
            return f"no layer view: {network.unsupported}"
        why = unsupported_reason(network.layers)
        if why:
            return why
        try:
            chain = chain_from_layers(network.layers)
        except InputError as exc:
            return str(exc)
        for part in self._parts(chain):
            with blas_threads(self._sdp.threads):
                scaled, _ = power_of_two_scales(part)
                est = estimate(scaled, reduce_input(scaled), self._sdp.solver)
            if est.total_gb > self._sdp.memory_budget_gb:
                return (f"LipSDP needs about {est.total_gb:.2f} GiB (matrix "
                        f"{est.solved_size}x{est.solved_size}, check {est.full_size}"
                        f"x{est.full_size}) > budget {self._sdp.memory_budget_gb:.2f} GiB; "
                        "use split or raise memory_budget_gb")
            if est.solved_size > self.options.max_size:
                return (f"LipSDP matrix {est.solved_size}x{est.solved_size} exceeds max_size "
                        f"{self.options.max_size} (solve time grows as n^3: hours per class "
                        "pair); use split or raise max_size")
        return None

    def _parts(self, chain: Chain) -> list[Chain]:
        split = self.options.split
        return split_chain(chain, split) if split else [chain]

    # -- bounds ------------------------------------------------------------------------------
    def _cache(self, network: Network) -> BoundCache:
        key = (f"{network.fingerprint}-{self._sdp.form.value}-"
               f"{'s' + str(self.options.split) if self.options.split else 'whole'}")
        if key not in self._caches:
            self._caches[key] = BoundCache(self.options.cache_dir, key)
        return self._caches[key]

    def _solve(self, chain: Chain, time_limit: float | None = None) -> SDPBound:
        sdp = self._sdp if time_limit is None else dataclasses.replace(self._sdp,
                                                                        time_limit=time_limit)
        if self.options.split:
            return split_bound(chain, self.options.split, sdp)
        return chain_bound(chain, sdp)

    def _fixed_seconds(self, chain: Chain) -> tuple[float, float]:
        """Estimated seconds of set-up plus check, and of the check alone, of `chain`'s SDPs.

        Summed over the parts when split.
        """
        if self._cubic_seconds is None:
            a = np.random.default_rng(0).standard_normal((CALIBRATION_SIZE,) * 2)
            with blas_threads(self._sdp.threads):
                begin = time.perf_counter()
                sla.eigvalsh(a + a.T, subset_by_index=[CALIBRATION_SIZE - 1] * 2)
                self._cubic_seconds = (time.perf_counter() - begin) / CALIBRATION_SIZE ** 3
        fixed = check = 0.0
        for part in self._parts(chain):
            hidden = sum(part.hidden_sizes)
            full = part.input_size + hidden
            solved = min(part.input_size, part.hidden_sizes[0]) + hidden
            check += self._cubic_seconds * full ** 3
            fixed += self._cubic_seconds * solved ** 3
        return fixed + check, check

    def _sdp_seconds(self, network: Network, chain: Chain) -> float:
        """Estimated seconds of one more SDP of `network`: measured, else modelled."""
        measured = self._cache(network).solve_seconds()
        if measured is not None:
            return measured
        fixed, _ = self._fixed_seconds(chain)
        cubes = SOLVE_CUBES.get(self._sdp.solver, OTHER_SOLVER_CUBES)
        solved = sum((min(p.input_size, p.hidden_sizes[0]) + sum(p.hidden_sizes)) ** 3
                     for p in self._parts(chain))
        return fixed + cubes * (self._cubic_seconds or 0.0) * solved

    def estimate_seconds(self, network: Network, problem: Problem) -> float | None:
        """Seconds until LipSDP could settle its first input of `problem` (None: no estimate).

        An input needs all its label's pair bounds, so: the fewest pairs still unsolved over
        the labels of inputs that could verify (pruned as in `certify`), times the seconds of
        one SDP. 0 when nothing is left to solve (certify is then a forward pass).
        """
        if problem.labels is None or not self.options.pairwise:
            return None
        pert = problem.perturbation
        factor = 1.0 if pert.norm == Norm.L2 else math.sqrt(network.input_size) * (1 + 1e-15)
        outputs = sound_outputs(network, pert.centres(problem.inputs))
        hopeful = self._hopeful(network, problem, outputs, factor)
        cache = self._cache(network)
        k = network.num_outputs
        missing = [sum(cache.get(f"pair:{min(y, j)}-{max(y, j)}") is None
                       for j in range(k) if j != y)
                   for y in {int(t) for t in problem.labels[hopeful]}]
        fewest = min(missing, default=0)
        if fewest == 0:
            return 0.0
        chain = chain_from_layers(network.require_layers())
        return fewest * self._sdp_seconds(network, chain)

    def _row_bound(self, network: Network, chain: Chain, name: str, last: np.ndarray,
                   deadline: float | None = None) -> float:
        """The cached or solved bound; inf when `deadline` passed before the solve could start.

        A solve cut short by the deadline still gives a checked (looser) bound, which is used
        but not cached.
        """
        cache = self._cache(network)
        value = cache.get(name)
        if value is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None:
                fixed, check = self._fixed_seconds(chain)
                if left <= fixed:
                    return math.inf
                left -= check  # the solver's share
            bound = self._solve(chain.with_last(last), left)
            value = bound.value
            if left is None or bound.verdict == Verdict.USE:
                cache.put(name, value, bound.details())
        return value

    def pair_bounds(self, network: Network, labels: np.ndarray | None = None,
                    deadline: float | None = None) -> np.ndarray:
        """`L[y, j]`: proven L2 bounds of `f_y - f_j` (symmetric, zero diagonal).

        With `labels`, only the pairs those labels need (the others are inf); pairs not solved
        before `deadline` are inf too.
        """
        chain = chain_from_layers(network.require_layers())
        k = chain.last.shape[0]
        rows = range(k) if labels is None else sorted({int(t) for t in labels})
        out = np.full((k, k), math.inf)
        np.fill_diagonal(out, 0.0)
        for y in rows:
            for j in range(k):
                if j == y or math.isfinite(out[y, j]):
                    continue
                lo, hi = min(y, j), max(y, j)
                row = chain.last[lo] - chain.last[hi]
                out[y, j] = out[j, y] = self._row_bound(network, chain, f"pair:{lo}-{hi}", row,
                                                        deadline)
        return out

    def global_bound(self, network: Network, deadline: float | None = None) -> float:
        """A proven L2 bound of the whole network (all outputs); inf past `deadline`."""
        chain = chain_from_layers(network.require_layers())
        return self._row_bound(network, chain, "global", chain.last, deadline)

    def row_bound(self, network: Network, row: np.ndarray,
                  deadline: float | None = None) -> float:
        """A proven L2 bound of `x -> row . f(x)`; inf when `deadline` passed before a solve."""
        row = np.asarray(row, np.float64).reshape(-1)
        nz = np.flatnonzero(row)
        if len(nz) == 2 and row[nz[0]] == -row[nz[1]]:
            y, j = (nz[0], nz[1]) if row[nz[0]] > 0 else (nz[1], nz[0])
            lo, hi = min(y, j), max(y, j)
            scale = abs(float(row[nz[0]]))
            return round_up(scale * self.pair_bounds_entry(network, int(lo), int(hi), deadline))
        if not self.options.pairwise:
            return round_up(float(np.linalg.norm(row)) * self.global_bound(network, deadline))
        chain = chain_from_layers(network.require_layers())
        name = f"row:{row.tobytes().hex()[:64]}:{len(row)}"
        return self._row_bound(network, chain, name, row @ chain.last, deadline)

    def pair_bounds_entry(self, network: Network, y: int, j: int,
                          deadline: float | None = None) -> float:
        """The bound of `f_y - f_j` (`y < j`), solving only that pair if not cached."""
        if not self.options.pairwise:
            return round_up(math.sqrt(2.0) * self.global_bound(network, deadline))
        chain = chain_from_layers(network.require_layers())
        return self._row_bound(network, chain, f"pair:{y}-{j}", chain.last[y] - chain.last[j],
                               deadline)

    def lipschitz(self, network: Network, norm: Norm) -> LipschitzBound:
        """A proven global bound (L2 to L2; L-inf as sqrt(n) times it, which bounds inf-to-2).

        With `timeout`, a solve stopped by it gives a checked, looser bound.
        """
        start = time.perf_counter()
        deadline = None if self.options.timeout is None else \
            time.monotonic() + self.options.timeout
        value = self.global_bound(network, deadline)
        if not math.isfinite(value):
            raise ResourceError(f"lipsdp: no bound within the {self.options.timeout}s timeout")
        details = {"method": self._method(), "norm_note": "L2 -> L2"}
        if norm == Norm.LINF:
            value = round_up(value * math.sqrt(network.input_size) * (1 + 1e-15))
            details["norm_note"] = "sqrt(n) x L2 bound: L-inf input to L2 (and L-inf) output"
        return LipschitzBound(value, norm, Scope.GLOBAL, self.name, time.perf_counter() - start,
                              True, details)

    def _method(self) -> str:
        text = f"LipSDP-{self._sdp.form.value} ({self._sdp.solver.value})"
        if self.options.split:
            text += f", product over sub-networks of {self.options.split} hidden layers"
        return text

    # -- certificates ------------------------------------------------------------------------
    def _hopeful(self, network: Network, problem: Problem, outputs: SoundOutputs,
                 factor: float) -> np.ndarray:
        """Inputs LipSDP may still verify at eps (all, in radius mode or without `prune`).

        LipSDP's bound of `f_y - f_j` is at least its true Lipschitz constant, which is at least
        any checked gradient norm: `margin / lower bound` bounds the radius LipSDP can reach.
        Computed only when a needed pair is not cached yet (then pruning saves solves).
        """
        labels = problem.labels
        everyone = np.ones(len(problem), bool)
        eps = problem.perturbation.eps
        if not (self.options.prune and self.options.pairwise) or problem.want_radius \
                or eps <= 0 or not len(problem):
            return everyone
        cache = self._cache(network)
        k = network.num_outputs
        if all(cache.get(f"pair:{min(y, j)}-{max(y, j)}") is not None
               for y in {int(t) for t in labels} for j in range(k) if j != y):
            return everyone
        data = np.asarray(problem.perturbation.centres(problem.inputs))
        low = pairwise_lower_bound(network, data, norm=Norm.L2, seed=self.options.seed,
                                   options=LowerBoundOptions(
            max_points=len(data), random_points=PRUNE_RANDOM_POINTS)).values
        seen = self._pair_lows.get(network.fingerprint)
        if seen is not None:
            low = np.maximum(low, seen)
        self._pair_lows[network.fingerprint] = low
        reach = robust_radii(outputs, labels, low * factor)
        hopeful = reach >= eps
        log.info("lipsdp: %d of %d inputs can still verify at eps %g", int(hopeful.sum()),
                 len(problem), eps)
        return hopeful

    def _hopeful_rows(self, network: Network, problem: Problem, outputs: SoundOutputs,
                      factor: float) -> set[bytes] | None:
        """The property rows whose LipSDP bound could still prove them at eps on some input
        (None: all, in radius mode or without `prune`).

        As `_hopeful` for pairs: a row's bound is at least its true Lipschitz constant, which
        is at least a checked gradient norm, so `slack / lower bound` caps its radius.
        """
        eps = problem.perturbation.eps
        if not self.options.prune or problem.want_radius or eps <= 0 or not len(problem):
            return None
        rows = {row.tobytes(): row for prop in problem.properties for c, _ in prop.terms
                for row in np.asarray(c, np.float64)}
        if not rows:
            return None
        keys = list(rows)
        matrix = np.stack([rows[k] for k in keys])
        data = np.asarray(problem.perturbation.centres(problem.inputs))
        low = row_lower_bounds(network, data, matrix, random_points=PRUNE_RANDOM_POINTS,
                               seed=self.options.seed)
        fingerprint = network.fingerprint
        for i, key in enumerate(keys):
            memo = (fingerprint, key)
            low[i] = self._row_lows[memo] = max(low[i], self._row_lows.get(memo, 0.0))
        low = low * factor
        needed = set()
        for prop, y in zip(problem.properties, outputs.values, strict=True):
            for c, d in prop.terms:
                for row, rhs in zip(np.asarray(c, np.float64), d, strict=True):
                    key = row.tobytes()
                    if float(row @ y - rhs) >= low[keys.index(key)] * eps:
                        needed.add(key)
        log.info("lipsdp: %d of %d property rows can still verify at eps %g", len(needed),
                 len(keys), eps)
        return needed

    def certify(self, network: Network, problem: Problem) -> list[Certificate]:
        """Certificates from centre margins and (pairwise) LipSDP bounds.

        Stops at the problem's deadline or `timeout` (whichever is first): the running solve is
        cut short (its checked bound still counts), no further SDP starts, and inputs missing a
        bound end as `timeout`.
        """
        start = time.perf_counter()
        deadline = deadline_of(problem, self.options.timeout)
        pert = problem.perturbation
        norm = pert.norm
        factor = 1.0 if norm == Norm.L2 else math.sqrt(network.input_size) * (1 + 1e-15)
        try:
            outputs = sound_outputs(network, pert.centres(problem.inputs))
            labels = problem.labels
            if labels is not None:
                hopeful = self._hopeful(network, problem, outputs, factor)
                if self.options.pairwise:
                    pairs = self.pair_bounds(network, labels[hopeful], deadline)
                else:
                    pairs = np.full((network.num_outputs,) * 2, round_up(
                        math.sqrt(2.0) * self.global_bound(network, deadline)))
                pairs = np.nextafter(pairs * factor, np.inf)
                radii = robust_radii(outputs, labels, pairs)
                late = ~np.all(np.isfinite(pairs[labels]), axis=1) & hopeful
                seconds = time.perf_counter() - start
                eps = pert.enclosing_radius(norm)
                details = [{"method": self._method()} if h else
                           {"method": self._method(), "pruned": PRUNED} for h in hopeful]
                certs = certificates_from_radii(radii, eps, self.name, seconds, details)
                return _timed_out(certs, late)
            missed: list[bool] = []
            needed = self._hopeful_rows(network, problem, outputs, factor)

            def row_lipschitz(row: np.ndarray) -> float:
                if needed is not None and row.tobytes() not in needed:
                    return math.inf  # no bound this solver proves reaches eps on this row
                value = self.row_bound(network, row, deadline)
                missed.append(not math.isfinite(value))
                return round_up(value * factor)

            certs = margin_certificates(problem, outputs, row_lipschitz, self.name,
                                        time.perf_counter() - start)
            return _timed_out(certs, np.full(len(certs), any(missed)))
        except LipverifyError as exc:  # ResourceError, solver and check failures
            log.warning("lipsdp: %s", exc)
            per = (time.perf_counter() - start) / max(len(problem), 1)
            return [Certificate(Status.ERROR, self.name, seconds=per,
                                details={"error": str(exc)}) for _ in range(len(problem))]


PRUNED = "cannot reach eps: margin / (checked gradient-norm lower bound of the pair's Lipschitz " \
    "constant) < eps"


def _timed_out(certs: list[Certificate], late: np.ndarray) -> list[Certificate]:
    """`timeout` instead of `unknown` where a bound was missing at the deadline."""
    return [dataclasses.replace(c, status=Status.TIMEOUT)
            if miss and c.status == Status.UNKNOWN else c
            for c, miss in zip(certs, late, strict=True)]
