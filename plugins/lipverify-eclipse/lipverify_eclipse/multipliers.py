"""Where ECLipsE's multipliers come from: ECLipsE-Fast's closed form, or eclipse-nn's stage SDP.

Neither is trusted: `lmi.prove_stage` proves each stage with whatever multipliers it is given.

- ECLipsE-Fast (closed form): `lambda_i = 1 / (2 lambda_max(M W_i Y^-1 W_i' M))` for every
  neuron of layer `i`, which makes `X_i >= lambda_i / 2 I` (for slopes with `lo * hi = 0`; a
  positive `lo * hi` only makes `X_i` larger).
- ECLipsE: eclipse-nn's per-stage SDP (`eclipse_nn.eclipsE.sdp`, SCS), which picks diagonal
  multipliers maximising how much of the next layer `X_i` dominates. Its answer is used only
  when the solve reports optimal (or optimal-inaccurate) with finite multipliers; otherwise the
  stage falls back to the closed form, as eclipse-nn itself does.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg as sla

from lipverify_eclipse.lmi import Slopes

log = logging.getLogger(__name__)

# eclipse-nn adds this to K before its symmetric square root (kept for fidelity).
SDP_K_JITTER = 1e-10
ACCEPTED_SDP_STATUS = ("optimal", "optimal_inaccurate")


def coupling(y_prev: np.ndarray, w: np.ndarray, s: Slopes) -> np.ndarray:
    """`K = M W Y^-1 W' M` (symmetric)."""
    mw = w * s.m[:, None]
    k = mw @ sla.cho_solve(sla.cho_factor(y_prev, lower=True), mw.T)
    return (k + k.T) / 2


def fast_multipliers(y_prev: np.ndarray, w: np.ndarray, s: Slopes) -> np.ndarray:
    """ECLipsE-Fast's closed-form multipliers (one value for the whole layer)."""
    k = coupling(y_prev, w, s)
    top = float(sla.eigvalsh(k, subset_by_index=[len(k) - 1] * 2)[0]) if len(k) else 0.0
    value = 1.0 / (2.0 * top) if top > 0 else 1.0
    return np.full(w.shape[0], value)


def sdp_multipliers(y_prev: np.ndarray, w: np.ndarray, s: Slopes,
                    w_next: np.ndarray) -> tuple[np.ndarray, str]:
    """eclipse-nn's stage SDP multipliers, or the closed form when the solve is not usable."""
    import torch
    from eclipse_nn.eclipsE import sdp

    k = coupling(y_prev, w, s) + SDP_K_JITTER * np.eye(w.shape[0])
    try:
        value, lam, _, status = sdp(w.shape[0], torch.as_tensor(w_next), torch.as_tensor(k))
    except Exception as exc:  # noqa: BLE001 - any solver failure falls back to the closed form
        log.info("eclipse stage SDP failed (%s: %s); using the closed form", type(exc).__name__,
                 exc)
        return fast_multipliers(y_prev, w, s), f"fast (SDP failed: {type(exc).__name__})"
    if status not in ACCEPTED_SDP_STATUS or lam is None or value is None:
        return fast_multipliers(y_prev, w, s), f"fast (SDP status {status})"
    diag = np.diag(lam.detach().cpu().numpy()).astype(np.float64)
    if not np.all(np.isfinite(diag)) or not np.any(diag > 0):
        return fast_multipliers(y_prev, w, s), "fast (SDP multipliers unusable)"
    return diag, f"sdp ({status})"
