"""Optimisation of the lower slopes (alpha) for the final objective rows, as alpha-CROWN does.

Each iterate's slopes (for positive and, optionally, negative coefficients), clamped to `[0, 1]`, give a valid bound and the multipliers are re-chosen
per iterate by `best_multiplier`, so optimisation only changes tightness. The best slopes per
objective row (each row has its own slopes) are kept; the returned bound is, per row, the larger
of the best bound seen (the starting slopes' included, so optimising never loosens a bound)
and one plain evaluation of `propagate` at the best slopes with the early Lipschitz closings
(left out while training, where inside a max they would hide the slopes' gradient). Each
candidate is a sound lower bound, hence so is their maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lipverify.bounds.chain import Chain
from lipverify.bounds.propagation import Propagated, propagate
from lipverify.bounds.relaxation import ReluBounds
from lipverify.types import deadline_passed

DEFAULT_ITERATIONS = 60
DEFAULT_LR = 0.5
DEFAULT_LR_DECAY = 0.98


@dataclass(frozen=True)
class SlopeOptions:
    """Adam on the slopes: `iterations` steps (0: CROWN's slopes), learning rate and decay.

    `upper`: optimise the slopes of neurons with negative coefficients too (CROWN keeps them at
    `u / (u - l)`, the best choice only without the coupling term). `deadline`: a
    `time.monotonic()` instant after which no further step is taken (the best slopes so far
    are kept: every iterate's bound is sound).
    """

    iterations: int = DEFAULT_ITERATIONS
    lr: float = DEFAULT_LR
    lr_decay: float = DEFAULT_LR_DECAY
    couple: bool = True
    upper: bool = True
    deadline: float | None = None


def optimised_bound(chain: Chain, rows: torch.Tensor, x0: torch.Tensor, rho: torch.Tensor,
                    relus: Sequence[ReluBounds], options: SlopeOptions | None = None,
                    target: torch.Tensor | None = None, end: int | None = None) -> Propagated:
    """Lower bounds `(B, S)` of `rows . z_end(x)` over the ball, slopes optimised.

    `end`: the block whose output the rows weigh (default: the logits); `relus` must hold the
    bounds of the ReLU layers before it.

    `target` `(B, S)`: values past which a row needs no more work (e.g. its threshold `d`);
    an input stops driving the loss once all its rows exceed their targets.
    """
    options = options or SlopeOptions()
    end = chain.num_relus if end is None else end
    batch, specs = rows.shape[:2]
    alphas = [t for r in relus for t in (r.initial_alpha().unsqueeze(1).expand(batch, specs, -1),
                                         r.upper_slope().unsqueeze(1).expand(batch, specs, -1))]
    alphas = [a.clone() for a in alphas]
    lam_state: dict[int, torch.Tensor] = {}  # multipliers carried between steps
    with torch.no_grad():
        initial = propagate(chain, end, rows, x0, rho, relus, _pairs(alphas), options.couple,
                            close_early=True, lam_state=lam_state)
    if options.iterations <= 0 or not relus:
        return initial
    best_alphas = [a.clone() for a in alphas]
    best_bound, best_mag = initial.bound.clone(), initial.magnitude.clone()
    params = [a.requires_grad_() for i, a in enumerate(alphas) if options.upper or i % 2 == 0]
    opt = torch.optim.Adam(params, lr=options.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, options.lr_decay)
    for _ in range(options.iterations):
        if deadline_passed(options.deadline):
            break
        # The slopes are trained on the propagated bound alone: the early Lipschitz closings
        # inside a max would hide their gradient.
        res = propagate(chain, end, rows, x0, rho, relus, _pairs(alphas), options.couple,
                        close_early=False, lam_state=lam_state)
        bound = res.bound
        with torch.no_grad():
            better = bound > best_bound
            best_bound = torch.where(better, bound, best_bound)
            best_mag = torch.where(better, res.magnitude, best_mag)
            for a, b in zip(alphas, best_alphas, strict=True):
                b.copy_(torch.where(better.unsqueeze(-1), a.clamp(0, 1), b))
            if target is not None:
                active = ~(best_bound > target).all(dim=1)
                if not bool(active.any()):
                    break
            else:
                active = torch.ones(batch, dtype=torch.bool, device=bound.device)
        loss = -(bound * active.unsqueeze(1)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for a in params:
                a.clamp_(0.0, 1.0)
    tracked = Propagated(best_bound.detach(), best_mag.detach())
    return _best_of(tracked, _final(chain, end, rows, x0, rho, relus, best_alphas, options))


def _best_of(a: Propagated, b: Propagated) -> Propagated:
    """Per row the larger of two sound lower bounds, with the magnitude behind it."""
    take_b = b.bound > a.bound
    return Propagated(torch.where(take_b, b.bound, a.bound),
                      torch.where(take_b, b.magnitude, a.magnitude))


@torch.no_grad()
def _final(chain: Chain, end: int, rows: torch.Tensor, x0: torch.Tensor, rho: torch.Tensor,
           relus: Sequence[ReluBounds], alphas: list[torch.Tensor],
           options: SlopeOptions) -> Propagated:
    """One plain evaluation at the given slopes, with every early closing."""
    return propagate(chain, end, rows, x0, rho, relus, _pairs(alphas), options.couple,
                     close_early=True)


def _pairs(flat: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`[lo_0, up_0, lo_1, up_1, ...]` as `[(lo_0, up_0), ...]`."""
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
