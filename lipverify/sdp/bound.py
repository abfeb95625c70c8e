"""`lipsdp_bound`: a proven LipSDP upper bound on a chain's Lipschitz constant (L2 to L2).

The pipeline: scale every matrix by a power of two (exact, and LipSDP is homogeneous), reduce
the input block to the rank of the first weight (same optimum), estimate memory and refuse past
the budget, solve, then certify the multipliers on the full matrix (`check`), and report
`sqrt(rho)` of the certified `rho`, rounded up, never the solver's objective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lipverify.errors import InputError, SolverError
from lipverify.sdp.assembly import Form, assemble
from lipverify.sdp.chain import (
    Chain,
    drop_constant_neurons,
    power_of_two_scales,
    reduce_input,
    split_chain,
)
from lipverify.sdp.check import certify_multipliers
from lipverify.sdp.memory import estimate, require_budget
from lipverify.sdp.solve import Solver, Verdict, solve_chain

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-6
DEFAULT_MEMORY_BUDGET_GB = 8.0


@dataclass(frozen=True)
class SDPOptions:
    """How to solve one LipSDP.

    `threads` caps BLAS threads during the solve and check (None: leave as is); one thread is
    the default because OpenBLAS threads spin and collapse when the cores are shared.
    """

    form: Form = Form.NEURON
    solver: Solver = Solver.IPM
    tolerance: float = DEFAULT_TOLERANCE
    memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB
    reduce_input: bool = True
    time_limit: float | None = None
    threads: int | None = 1

    def __post_init__(self) -> None:
        if not (self.tolerance > 0 and math.isfinite(self.tolerance)):
            raise InputError(f"tolerance must be positive, got {self.tolerance!r}")
        if not self.memory_budget_gb > 0:
            raise InputError(f"memory_budget_gb must be positive, got {self.memory_budget_gb!r}")


@dataclass(frozen=True)
class SDPBound:
    """A proven bound `value` on the L2 Lipschitz constant of a chain.

    `raw_objective` is the solver's `sqrt(rho)` (not a bound). `rho` and `multipliers` are the
    certified `(rho, lambda)` in the chain's own units (so `M(rho, lambda) <= 0` can be checked
    independently); `max_eigenvalue` and `margin` come from the float64 check on the
    power-of-two-normalised matrix. `chunks` > 1 when the value is a product over sub-chains.
    """

    value: float
    raw_objective: float
    status: str
    verdict: Verdict
    seconds: float
    max_eigenvalue: float
    margin: float
    rho: float
    multipliers: np.ndarray = field(repr=False)
    form: Form = Form.NEURON
    solver: Solver = Solver.IPM
    solved_size: int = 0
    full_size: int = 0
    chunks: int = 1

    def details(self) -> dict:
        """JSON-friendly summary."""
        return {"value": self.value, "raw_objective": self.raw_objective, "status": self.status,
                "verdict": self.verdict.value, "seconds": self.seconds,
                "max_eigenvalue": self.max_eigenvalue, "margin": self.margin,
                "form": self.form.value, "solver": self.solver.value,
                "solved_size": self.solved_size, "full_size": self.full_size,
                "chunks": self.chunks}


@contextlib.contextmanager
def _blas_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads, user_api="blas"):
        yield


def round_up(value: float) -> float:
    """The next float above `value` (one ulp of slack on a correctly rounded result)."""
    return float(np.nextafter(value, np.inf))


def original_multipliers(chain: Chain, form: Form, t: np.ndarray, exponents: Sequence[int]
                         ) -> np.ndarray:
    """Map `(rho, lambda)` of the power-of-two-scaled chain to the original chain (exact).

    With `W'_l = 2^-k_l W_l` and `E = sum k_l`: `rho = 4^E rho'` and a multiplier of hidden
    layer `l` (1-based) becomes `4^(k_l + ... + k_L) lambda'`.
    """
    total = sum(exponents)
    out = np.array(t, dtype=np.float64)
    out[0] = math.ldexp(out[0], 2 * total)
    suffix = [sum(exponents[li:]) for li in range(1, chain.depth + 1)]
    if form == Form.LAYER:
        for li in range(chain.depth):
            out[li + 1] = math.ldexp(out[li + 1], 2 * suffix[li])
    else:
        offsets = np.concatenate([[1], 1 + np.cumsum(chain.hidden_sizes)])
        for li in range(chain.depth):
            out[offsets[li]:offsets[li + 1]] = np.ldexp(out[offsets[li]:offsets[li + 1]],
                                                      2 * suffix[li])
    return out


def chain_bound(chain: Chain, options: SDPOptions = SDPOptions()) -> SDPBound:
    """A proven LipSDP bound for one chain (no splitting).

    Neurons with slopes `[0, 0]` are removed first (exactly); their entries in `multipliers`
    are NaN. A chain with a whole constant layer or an all-zero weight matrix has bound 0.
    """
    start = time.perf_counter()
    reduced_chain, keep = drop_constant_neurons(chain)
    if reduced_chain is None or _has_zero_map(chain):
        nan = np.full(1 + (chain.depth if options.form == Form.LAYER else
                           sum(chain.hidden_sizes)), np.nan)
        nan[0] = 0.0
        return SDPBound(0.0, 0.0, "constant", Verdict.USE, time.perf_counter() - start,
                        -math.inf, 0.0, 0.0, nan, options.form, options.solver)
    if reduced_chain is not chain:
        inner = chain_bound(reduced_chain, options)
        return _expand_multipliers(inner, chain, keep, options.form)
    with _blas_threads(options.threads):  # the SVDs of scaling and reduction too
        scaled, exponents = power_of_two_scales(chain)
        solved = reduce_input(scaled) if options.reduce_input else scaled
        require_budget(estimate(scaled, solved, options.solver), options.memory_budget_gb)
        try:
            raw = solve_chain(solved, options.form, options.solver, options.tolerance,
                              options.time_limit)
            full = assemble(scaled, options.form)
            checked = certify_multipliers(full, raw.t[1:], float(raw.t[0]))
        except np.linalg.LinAlgError as exc:
            raise SolverError(f"LipSDP ({options.solver.value}) failed on the "
                              f"{chain.input_size}->{'-'.join(map(str, chain.hidden_sizes))} "
                              f"chain: LinAlgError: {exc}") from exc
    total = sum(exponents)
    value = math.ldexp(round_up(math.sqrt(checked.rho)), total)
    raw_value = math.ldexp(math.sqrt(max(float(raw.t[0]), 0.0)), total)
    t_cert = np.concatenate([[checked.rho], checked.lambdas])
    seconds = time.perf_counter() - start
    log.info("LipSDP-%s (%s): %.6g (solver %.6g, %s) on %d->%d, %.2fs", options.form.value,
             options.solver.value, value, raw_value, raw.status, full.size, solved_size(solved),
             seconds)
    return SDPBound(value, raw_value, raw.status, raw.verdict, seconds, checked.max_eig,
                    checked.margin, math.ldexp(checked.rho, 2 * total),
                    original_multipliers(chain, options.form, t_cert, exponents), options.form,
                    options.solver, solved_size(solved), full.size)


def _has_zero_map(chain: Chain) -> bool:
    """True when a weight matrix (the last included) is all zeros: the chain is then constant.

    Its exact bound is 0; LipSDP would only approach it, and the interior-point solver fails on
    the singular system such a chain gives.
    """
    return any(not np.any(w) for w in (*chain.weights, chain.last))


def _expand_multipliers(bound: SDPBound, chain: Chain, keep: list[np.ndarray],
                        form: Form) -> SDPBound:
    """`bound` with its neuron multipliers placed back on `chain`'s neurons (NaN if dropped)."""
    if form == Form.LAYER:
        return bound
    full = np.full(1 + sum(chain.hidden_sizes), np.nan)
    full[0] = bound.multipliers[0]
    full[1:][np.concatenate(keep)] = bound.multipliers[1:]
    return dataclasses.replace(bound, multipliers=full)


def solved_size(chain: Chain) -> int:
    """Size of the LipSDP matrix of `chain`."""
    return chain.input_size + sum(chain.hidden_sizes)


def split_bound(chain: Chain, hidden_per_chunk: int,
                options: SDPOptions = SDPOptions()) -> SDPBound:
    """Product of LipSDP bounds of consecutive sub-chains (sound; looser than one SDP)."""
    parts = [chain_bound(c, options) for c in split_chain(chain, hidden_per_chunk)]
    if len(parts) == 1:
        return parts[0]
    value = 1.0
    raw = 1.0
    for p in parts:
        value = round_up(value * p.value)
        raw *= p.raw_objective
    worst = max(parts, key=lambda p: p.max_eigenvalue)
    verdict = Verdict.USE if all(p.verdict == Verdict.USE for p in parts) else \
        Verdict.USE_AFTER_CHECK
    return SDPBound(value, raw, ",".join(p.status for p in parts), verdict,
                    sum(p.seconds for p in parts), worst.max_eigenvalue, worst.margin,
                    math.nan, np.empty(0), options.form, options.solver,
                    max(p.solved_size for p in parts), max(p.full_size for p in parts),
                    len(parts))


def lipsdp_bound(weights: Sequence[np.ndarray], slopes: Sequence[tuple[np.ndarray, np.ndarray]],
                 options: SDPOptions = SDPOptions(), split: int | None = None) -> SDPBound:
    """A proven L2 Lipschitz bound of `x -> W_L phi_L(... phi_1(W_0 x))` by LipSDP.

    Reusable by other backends: `weights` are `W_0 ... W_L` (biases do not matter),
    `slopes[l] = (lo, hi)` per-neuron slope intervals of hidden layer `l + 1` (arrays, or scalars
    broadcast to the layer). A neuron fixed inactive has `[0, 0]`, fixed active `[1, 1]`,
    unstable ReLU `[0, 1]`. `split` bounds chunks of that many hidden layers and multiplies.
    """
    mats = [np.atleast_2d(np.asarray(w, np.float64)) for w in weights]
    if len(mats) != len(slopes) + 1:
        raise InputError(f"{len(mats)} weight matrices need {len(mats) - 1} slope intervals, "
                         f"got {len(slopes)}")
    intervals = []
    for w, (lo, hi) in zip(mats[:-1], slopes, strict=True):
        n = w.shape[0]
        intervals.append((np.broadcast_to(np.asarray(lo, np.float64), (n,)).copy(),
                          np.broadcast_to(np.asarray(hi, np.float64), (n,)).copy()))
    chain = Chain(tuple(mats[:-1]), tuple(intervals), mats[-1])
    if split is not None:
        return split_bound(chain, split, options)
    return chain_bound(chain, options)
