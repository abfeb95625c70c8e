"""Projected Adam on the slopes (alpha) and split multipliers (beta) of `backward_bound`.

Every iterate gives sound bounds (the parameters are clamped before use), so the best bound of
each row over the iterates is kept together with the parameters that gave it; optimising can
only tighten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BoundFn = Callable[[list[torch.Tensor], list[torch.Tensor] | None],
                   tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class Steps:
    """Adam steps, learning rates of alpha and beta, their decay per step, and the value a row
    need not exceed (rows above it stop pulling: 0 for a property, +inf for tightness)."""

    iterations: int = 20
    lr_alpha: float = 0.1
    lr_beta: float = 0.05
    decay: float = 0.98
    target: float = float("inf")


@dataclass(frozen=True, eq=False)
class Best:
    """Per row `(B, R)` the best bound, and the alpha, beta and coefficients that gave it."""

    value: torch.Tensor
    alpha: list[torch.Tensor]
    beta: list[torch.Tensor] | None
    coefs: list[torch.Tensor]


def optimise(bound: BoundFn, alpha: list[torch.Tensor], beta: list[torch.Tensor] | None,
             steps: Steps, stop: Callable[[torch.Tensor], bool] | None = None) -> Best:
    """Maximise each row of `bound(alpha, beta)` over `alpha in [0, 1]`, `beta >= 0`.

    `stop(best)` ends the loop early (e.g. once every domain is proven).
    """
    alpha = [a.detach().clone().requires_grad_(steps.iterations > 0) for a in alpha]
    beta = None if beta is None else [b.detach().clone().requires_grad_(steps.iterations > 0)
                                      for b in beta]
    groups = [{"params": alpha, "lr": steps.lr_alpha}]
    if beta is not None and steps.lr_beta > 0:
        groups.append({"params": beta, "lr": steps.lr_beta})
    opt = torch.optim.Adam(groups) if steps.iterations > 0 else None
    best: Best | None = None
    for it in range(steps.iterations + 1):
        with torch.set_grad_enabled(opt is not None and it < steps.iterations):
            value, coefs, _ = bound(alpha, beta)
        best = _keep(best, value.detach(), alpha, beta, coefs)
        if opt is None or it == steps.iterations or (stop is not None and stop(best.value)):
            break
        opt.zero_grad(set_to_none=True)
        (-value.clamp(max=steps.target)).sum().backward()
        opt.step()
        with torch.no_grad():
            for a in alpha:
                a.clamp_(0, 1)
            for b in beta or ():
                b.clamp_(min=0)
        for group in opt.param_groups:
            group["lr"] *= steps.decay
    assert best is not None
    return best


def _keep(best: Best | None, value: torch.Tensor, alpha: list[torch.Tensor],
          beta: list[torch.Tensor] | None, coefs: list[torch.Tensor]) -> Best:
    """`best` updated row by row where `value` is larger."""
    with torch.no_grad():
        alpha_now = [a.detach().clamp(0, 1) for a in alpha]
        beta_now = None if beta is None else [b.detach().clamp_min(0) for b in beta]
        coefs_now = [c.detach() for c in coefs]
        if best is None:
            return Best(value, alpha_now, beta_now, coefs_now)
        better = value > best.value
        mask = better[:, :, None]

        def pick(new: list[torch.Tensor], old: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.where(mask, n, o) for n, o in zip(new, old, strict=True)]

        return Best(torch.where(better, value, best.value), pick(alpha_now, best.alpha),
                    None if beta_now is None else pick(beta_now, best.beta),
                    pick(coefs_now, best.coefs))
