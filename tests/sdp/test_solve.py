"""Solver statuses are mapped explicitly; unknown ones fail loudly."""

import cvxpy as cp
import cvxpy.settings as cps
import pytest

from lipverify.sdp.solve import STATUS_MAP, SolveError, Solver, Verdict, verdict_of


def test_every_cvxpy_status_is_mapped():
    # every status string cvxpy defines
    statuses = {v for k, v in vars(cps).items() if k in {
        "OPTIMAL", "OPTIMAL_INACCURATE", "INFEASIBLE", "INFEASIBLE_INACCURATE", "UNBOUNDED",
        "UNBOUNDED_INACCURATE", "USER_LIMIT", "SOLVER_ERROR", "INFEASIBLE_OR_UNBOUNDED"}}
    assert len(statuses) == 9
    assert statuses <= set(STATUS_MAP)
    assert verdict_of(cp.OPTIMAL) == Verdict.USE
    assert verdict_of(cp.OPTIMAL_INACCURATE) == Verdict.USE_AFTER_CHECK
    assert verdict_of(cp.INFEASIBLE) == Verdict.FAIL


def test_unknown_status_raises():
    with pytest.raises(SolveError, match="unmapped"):
        verdict_of("something new")


def test_solver_names_parse():
    assert Solver.parse("SCS") == Solver.SCS
    assert Solver.parse("Clarabel") == Solver.CLARABEL
    with pytest.raises(ValueError, match="unknown LipSDP solver"):
        Solver.parse("mosek")
