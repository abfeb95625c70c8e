"""Memory needed by a LipSDP solve, estimated before anything large is built.

Calibrated on this project's benchmarks (peak resident memory): Clarabel stores the PSD cone's
`n_s x n_s` Newton block densely (`n_s = N(N+1)/2`), about 2.8 copies of it; SCS and cvxpy's
canonicalisation hold a few copies of the sparse map and of `N x N` work arrays; the
interior-point method a dozen `N x N` and a few `c x c` dense arrays; the final check a few
copies of the dense full (unreduced) matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from lipverify.errors import ResourceError
from lipverify.sdp.assembly import block_offsets, num_entries
from lipverify.sdp.chain import Chain
from lipverify.sdp.solve import Solver

BYTES = 8
GIB = 1024**3
CLARABEL_BLOCK_COPIES = 3.0
SCS_DENSE_COPIES = 8.0
SCS_BYTES_PER_ENTRY = 200.0
SOLVER_OVERHEAD = 200 * 1024**2
IPM_DENSE_COPIES = 16.0
IPM_SCHUR_COPIES = 8.0
CHECK_DENSE_COPIES = 6.0


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes for the solve (on the reduced LMI) and for the check (on the full one)."""

    solve_bytes: int
    check_bytes: int
    solved_size: int
    full_size: int

    @property
    def total_gb(self) -> float:
        """Peak estimate in GiB (solve and check do not overlap)."""
        return max(self.solve_bytes, self.check_bytes) / GIB


def estimate(full: Chain, reduced: Chain, solver: Solver) -> MemoryEstimate:
    """Peak memory of solving `reduced` with `solver` and checking on `full`."""
    n = block_offsets(reduced)[-1]
    n_full = block_offsets(full)[-1]
    if solver == Solver.CLARABEL:
        n_s = n * (n + 1) // 2
        solve = CLARABEL_BLOCK_COPIES * BYTES * n_s * n_s
    elif solver == Solver.SCS:
        solve = SCS_DENSE_COPIES * BYTES * n * n + SCS_BYTES_PER_ENTRY * num_entries(reduced)
    else:
        c = n + sum(reduced.hidden_sizes)
        solve = IPM_DENSE_COPIES * BYTES * n * n + IPM_SCHUR_COPIES * BYTES * c * c
    check = CHECK_DENSE_COPIES * BYTES * n_full * n_full
    return MemoryEstimate(int(solve + SOLVER_OVERHEAD), int(check), n, n_full)


def require_budget(est: MemoryEstimate, budget_gb: float, what: str = "LipSDP") -> None:
    """Raise `ResourceError` with the estimate when it exceeds the budget."""
    if est.total_gb > budget_gb:
        raise ResourceError(f"{what} needs about {est.total_gb:.2f} GiB (solve on a "
                            f"{est.solved_size}x{est.solved_size} matrix, check on "
                            f"{est.full_size}x{est.full_size}); budget is {budget_gb:.2f} GiB. "
                            "Raise memory_budget_gb, use solver 'ipm', or split the network")
