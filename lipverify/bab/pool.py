"""The branch and bound's open sub-domains (`Pool`), the property's terms, and the bookkeeping
of a split: setting it, finding the shallowest one, and a domain's value over its term."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Terms:
    """The property's terms as rows: `c` `(T, R, m)`, `d` `(T, R)`, `valid` `(T, R)` (padding
    rows are False). A term with no valid row is absent (already refuted)."""

    c: torch.Tensor
    d: torch.Tensor
    valid: torch.Tensor


@dataclass(eq=False)
class Pool:
    """Open sub-domains: split signs, slopes (`alpha`: the lower ones, then with `blend` per
    ReLU the split neurons' upper-line weights `tau`), multipliers, bound, term, branching
    candidates, and the root-unstable neurons' bounds on the domain (`Interm`, float32
    guides)."""

    splits: list[torch.Tensor]
    alpha: list[torch.Tensor]
    beta: list[torch.Tensor]
    value: torch.Tensor
    term: torch.Tensor
    cand: torch.Tensor
    lower: list[torch.Tensor]
    upper: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.value)

    def take(self, index: torch.Tensor) -> Pool:
        def pick(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t[index] for t in tensors]

        return Pool(pick(self.splits), pick(self.alpha), pick(self.beta), self.value[index],
                    self.term[index], self.cand[index], pick(self.lower), pick(self.upper))

    @staticmethod
    def cat(parts: list[Pool]) -> Pool:
        def join(name: str) -> list[torch.Tensor]:
            lists = [getattr(p, name) for p in parts]
            return [torch.cat([t[k] for t in lists]) for k in range(len(lists[0]))]

        return Pool(join("splits"), join("alpha"), join("beta"),
                    torch.cat([p.value for p in parts]), torch.cat([p.term for p in parts]),
                    torch.cat([p.cand for p in parts]), join("lower"), join("upper"))


def set_split(pool: Pool, flat: torch.Tensor, sign: int, offsets: torch.Tensor) -> None:
    """Split every domain of `pool` at flat neuron `flat[b]` with `sign` (in place).

    The new split neuron starts exact on its side (lower slope 1 if active, 0 if inactive;
    upper-line weight `tau` 1): the clamped relaxation beta-CROWN starts from. Its multiplier
    starts at 0.
    """
    layer = layer_of(flat, offsets)
    relus = len(pool.splits)
    for k in range(relus):
        mine = torch.nonzero(layer == k).flatten()
        if len(mine):
            at = flat[mine] - offsets[k]
            pool.splits[k] = pool.splits[k].clone()
            pool.splits[k][mine, at] = sign
            pool.alpha[k] = pool.alpha[k].clone()
            pool.alpha[k][mine, :, at] = 1.0 if sign > 0 else 0.0
            if len(pool.alpha) > relus:  # blended relaxations: tau per ReLU
                pool.alpha[relus + k] = pool.alpha[relus + k].clone()
                pool.alpha[relus + k][mine, :, at] = 1.0


def layer_of(flat: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The ReLU of each flat neuron index (`offsets`: cumulative layer sizes from 0)."""
    return torch.searchsorted(offsets, flat.contiguous(), right=True) - 1


def first_split(splits: list[torch.Tensor]) -> int:
    """The shallowest ReLU with a split on any domain (the number of ReLUs when none)."""
    for k, s in enumerate(splits):
        if bool((s != 0).any()):
            return k
    return len(splits)


def term_value(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per domain the max over its term's valid rows (`(B, R)` -> `(B,)`)."""
    return torch.where(valid, rows, torch.full_like(rows, -math.inf)).max(dim=1).values
