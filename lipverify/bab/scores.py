"""Which neuron to split: BaBSR-style scores of each open sub-domain's unstable neurons.

A neuron's score is what its ReLU relaxation costs the domain's worst row (the intercept of
its upper line times the row's negative coefficient), plus a small width term to break ties.
Split neurons and root-stable ones are never candidates; root-unstable neurons the domain's own
bounds make stable come last, so that a fully split leaf has every root-unstable neuron split.
"""

from __future__ import annotations

import math

import torch

from lipverify.bab.pool import Pool
from lipverify.bab.root import Bounds

CANDIDATES = 8  # best-scored neurons kept per open sub-domain
STABLE_SCORE = -1e30  # a root-unstable neuron the domain's own bounds make stable


def candidates(pool: Pool, bounds: Bounds, coefs: list[torch.Tensor], rows: torch.Tensor,
           valid: torch.Tensor, unstable: list[torch.Tensor]) -> torch.Tensor:
    """Per domain the flat indices `(B, CANDIDATES + ReLUs)` of its best-scored splittable
    neurons, then of each ReLU's best neuron unstable on the domain (-1: none)."""
    device = pool.value.device
    if not len(pool):
        return torch.zeros((0, CANDIDATES + len(unstable)), dtype=torch.long,
                           device=device)
    valid = valid[pool.term]
    row = torch.where(valid, rows, torch.full_like(rows, -math.inf)).argmax(dim=1)
    batch = torch.arange(len(pool), device=device)
    parts = []
    for (lo, up), a, s, root in zip(bounds, coefs, pool.splits, unstable, strict=True):
        coef = a[batch, row]  # (B, n)
        lo, up = lo.expand_as(coef), up.expand_as(coef)  # the domain's
        open_ = root[None] & (s == 0)
        live = open_ & (lo < 0) & (up > 0)
        width = torch.where(live, up - lo, torch.ones_like(up))
        intercept = torch.where(live, -up * lo / width, torch.zeros_like(up))
        score = torch.relu(-coef) * intercept + 1e-4 * coef.abs() * width
        # stable on the domain but not split: last, so that leaves are exactly split
        score = torch.where(live, score, torch.full_like(score, STABLE_SCORE))
        parts.append(torch.where(open_, score, torch.full_like(score, -math.inf)))
    scores = torch.cat(parts, dim=1)
    k = min(CANDIDATES, scores.shape[1])
    top, index = scores.topk(k, dim=1)
    index = torch.where(torch.isfinite(top), index, torch.full_like(index, -1))
    if k < CANDIDATES:
        pad = torch.full((len(pool), CANDIDATES - k), -1, dtype=torch.long,
                         device=device)
        index = torch.cat([index, pad], dim=1)
    per_layer, start = [], 0
    for part in parts:
        best, at = part.max(dim=1)
        live = torch.isfinite(best) & (best > STABLE_SCORE)
        per_layer.append(torch.where(live, at + start, torch.full_like(at, -1)))
        start += part.shape[1]
    return torch.cat([index, torch.stack(per_layer, dim=1)], dim=1)
