"""Run a LipSDP solve: cvxpy (SCS, Clarabel) or the structured interior-point method.

Every native status is mapped explicitly through `STATUS_MAP` to what may be done with the
multipliers; nothing here is a bound yet (see `check.certify_multipliers`).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass

import numpy as np

from lipverify.errors import InputError, LipverifyError
from lipverify.sdp.assembly import LMI, Form, assemble
from lipverify.sdp.chain import Chain
from lipverify.sdp.ipm import solve_ipm

log = logging.getLogger(__name__)

# SCS iteration cap: at its default tolerances LipSDP needs a few hundred iterations.
SCS_MAX_ITERS = 20000


class Solver(enum.Enum):
    """Which solver minimises rho."""

    IPM = "ipm"
    SCS = "scs"
    CLARABEL = "clarabel"

    @classmethod
    def parse(cls, text: str | Solver) -> Solver:
        """Read a solver name (any case)."""
        if isinstance(text, Solver):
            return text
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            raise InputError(f"unknown LipSDP solver {text!r}: use "
                             f"{', '.join(s.value for s in cls)}") from None


class Verdict(enum.Enum):
    """What a solver status allows: every accepted answer is still checked and repaired."""

    USE = "use"                        # solved: multipliers go to the check
    USE_AFTER_CHECK = "use_after_check"  # inaccurate or stopped early: only the check decides
    FAIL = "fail"                      # no usable multipliers


# cvxpy's status strings (and the IPM's, which reuses them) -> what the multipliers are good for.
STATUS_MAP: dict[str, Verdict] = {
    "optimal": Verdict.USE,
    "optimal_inaccurate": Verdict.USE_AFTER_CHECK,
    "user_limit": Verdict.USE_AFTER_CHECK,
    "infeasible": Verdict.FAIL,
    "infeasible_inaccurate": Verdict.FAIL,
    "unbounded": Verdict.FAIL,
    "unbounded_inaccurate": Verdict.FAIL,
    "infeasible_or_unbounded": Verdict.FAIL,
    "solver_error": Verdict.FAIL,
}


class SolveError(LipverifyError):
    """The solver gave no multipliers that can be checked."""


@dataclass(frozen=True)
class RawSolution:
    """A solver's `t = (rho, lambda...)` and status: not a bound until checked."""

    t: np.ndarray
    status: str
    verdict: Verdict
    seconds: float
    iterations: int


def verdict_of(status: str) -> Verdict:
    """The verdict for a native status; unknown statuses fail loudly rather than pass."""
    try:
        return STATUS_MAP[status]
    except KeyError:
        raise SolveError(f"unmapped solver status {status!r}") from None


def solve_cvxpy(lmi: LMI, solver: Solver, tolerance: float,
                time_limit: float | None) -> RawSolution:
    """Minimise rho with one PSD constraint on the affine map `-M(t)`, through cvxpy."""
    import cvxpy as cp

    start = time.perf_counter()
    a, m0 = lmi.cvxpy_map()
    t = cp.Variable(lmi.num_vars)
    n = lmi.size
    # The map yields the upper triangle U with doubled off-diagonals; cvxpy's PSD constraint
    # applies to the symmetric part (U + U^T)/2 = M(t).
    m_expr = cp.reshape(a @ t + m0, (n, n), order="F")
    problem = cp.Problem(cp.Minimize(t[0]), [-m_expr >> 0, t >= 0])
    kwargs: dict = {}
    if solver == Solver.SCS:
        kwargs = {"eps_abs": tolerance, "eps_rel": tolerance, "max_iters": SCS_MAX_ITERS}
        if time_limit is not None:
            kwargs["time_limit_secs"] = float(time_limit)
    elif solver == Solver.CLARABEL:
        kwargs = {"tol_gap_abs": tolerance, "tol_gap_rel": tolerance, "tol_feas": tolerance}
        if time_limit is not None:
            kwargs["time_limit"] = float(time_limit)
    try:
        problem.solve(solver=solver.value.upper(), **kwargs)
        status = str(problem.status)
    except cp.SolverError as exc:
        log.warning("LipSDP: %s failed: %s", solver.value, exc)
        status = "solver_error"
    verdict = verdict_of(status)
    seconds = time.perf_counter() - start
    iters = int(getattr(problem.solver_stats, "num_iters", 0) or 0)
    if verdict == Verdict.FAIL or t.value is None:
        raise SolveError(f"LipSDP: {solver.value} returned status {status!r} without usable "
                         "multipliers")
    return RawSolution(np.asarray(t.value, np.float64), status, verdict, seconds, iters)


def solve_chain(chain: Chain, form: Form, solver: Solver, tolerance: float,
                time_limit: float | None = None) -> RawSolution:
    """Solve LipSDP for `chain` (already normalised and reduced) with `solver`."""
    if solver == Solver.IPM:
        res = solve_ipm(chain, form, tolerance, time_limit)
        status = "optimal" if res.converged else "optimal_inaccurate"
        return RawSolution(res.t, status, verdict_of(status), res.seconds, res.iterations)
    return solve_cvxpy(assemble(chain, form), solver, tolerance, time_limit)
