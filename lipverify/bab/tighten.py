"""Tighter root pre-activation bounds: neurons proven stable by branch and bound on the chain
cut at their layer (what alpha-beta-CROWN's MIP refinement does, with sound bounds instead).

alpha-CROWN's bounds of deep layers can be far looser than the network's reach: on mnist_fc
256x6 `prop_1_0.03` it leaves 230 of layer 4's 256 neurons unstable where an attack finds only
10 on both sides of 0, and every later neuron unstable. Layer by layer, the unstable neurons
that no attack shows on both sides of 0 are tried: a partial `Search` on the chain that ends at
their layer, one term per neuron (`-z_j > 0` or `z_j > 0`), refutes what it can in its share of
the time; each refuted neuron is stable on the whole region, so its bound is clamped at 0 (a
proof of the search, float64 with its rounding allowance), and the later layers' bounds are
recomputed over the new ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lipverify.bab.optimise import Steps
from lipverify.bab.pool import Terms
from lipverify.bab.relaxed import InputSet
from lipverify.bab.root import Root, root_relaxation
from lipverify.bab.search import Search, SearchOptions
from lipverify.bounds.chain import Chain


@dataclass(frozen=True)
class TightenOptions:
    """`share` of the time left spent tightening (`seconds` when there is no deadline), split
    evenly among the layers tried; layers with fewer than `least` candidates are skipped;
    `attack_steps` of signed gradient per neuron and side find the surely unstable ones.
    `shrink` > 0: the last `shrink_share` of each layer's time tries to move the bounds of
    the neurons left unstable `shrink` of the way towards what the attack reaches."""

    share: float = 0.4
    seconds: float = 30.0
    least: int = 8
    attack_steps: int = 30
    shrink: float = 0.5
    shrink_share: float = 0.4


@dataclass(frozen=True)
class Tightened:
    """The tighter root, and per layer how many neurons were unstable, tried and proven."""

    root: Root
    unstable: tuple[int, ...]
    tried: tuple[int, ...]
    proven: tuple[int, ...]


def tighten_root(chain: Chain, inputs: InputSet, steps: Steps, search: SearchOptions,
                 options: TightenOptions = TightenOptions(), deadline: float | None = None,
                 seed: int = 0) -> Tightened:
    """Root bounds of `chain` over `inputs`, each layer's stabilisable neurons proven stable
    where a partial search can (in `search`'s float dtype, proofs in float64)."""
    now = time.monotonic()
    stop = now + (options.share * (deadline - now) if deadline is not None else options.seconds)
    root = Root([], [])
    unstable, tried, proven = [], [], []
    generator = torch.Generator(device=inputs.centre.device).manual_seed(seed)
    for k in range(chain.num_relus):
        # ReLU k's bounds only, over the earlier ones as tightened (a chain of k + 1 ReLUs)
        root = root_relaxation(Chain(chain.blocks[:k + 2], chain.input_shape), inputs, steps,
                               search.dtype, deadline, given=root)
        lo, up = root.bounds[k]
        live = (lo < 0) & (up > 0)
        unstable.append(int(live.sum()))
        layers_left = chain.num_relus - k
        if k == 0 or time.monotonic() >= stop or not live.any():
            tried.append(0)
            proven.append(0)
            continue
        cut = Chain(chain.blocks[:k + 1], chain.input_shape)
        reach_lo, reach_up = _reach(cut, inputs, options.attack_steps, generator)
        below, above = live & (reach_up < 0), live & (reach_lo > 0)
        index = torch.nonzero(below | above).flatten()
        tried.append(len(index))
        end = time.monotonic() + (stop - time.monotonic()) / layers_left
        done = torch.zeros(0, dtype=torch.bool, device=lo.device)
        if len(index) >= options.least:
            # -z_j > 0 (z_j < 0) for a neuron the attack keeps below 0, z_j > 0 above
            sign = torch.where(below[index], -1.0, 1.0).to(torch.float64)
            until = end - options.shrink_share * (end - time.monotonic()) \
                if options.shrink > 0 else end
            zero = torch.zeros_like(sign)
            done = _prove(cut, inputs, root, k, index, sign, zero, search, until)
            lo, up = _moved(lo, up, index, sign, zero, done)
        proven.append(int(done.sum()))
        still = torch.nonzero((lo < 0) & (up > 0)).flatten()
        if options.shrink > 0 and len(still) >= options.least and time.monotonic() < end:
            # the neurons left unstable: each bound moved `shrink` of the way to the reach
            theta = options.shrink
            index = torch.cat([still, still])
            sign = torch.cat([-torch.ones(len(still)), torch.ones(len(still))]).to(lo)
            target = torch.cat([reach_up[still] + (1 - theta) * (up[still] - reach_up[still]),
                                reach_lo[still] - (1 - theta) * (reach_lo[still] - lo[still])])
            target = torch.where(sign < 0, target.clamp(min=0.0), target.clamp(max=0.0))
            moved = _prove(cut, inputs, root, k, index, sign, target, search, end)
            lo, up = _moved(lo, up, index, sign, target, moved)
        root = Root([*root.bounds[:k], (lo, up)], root.slopes)
    return Tightened(root, tuple(unstable), tuple(tried), tuple(proven))


def _prove(cut: Chain, inputs: InputSet, root: Root, k: int, index: torch.Tensor,
           sign: torch.Tensor, target: torch.Tensor, search: SearchOptions, until: float
           ) -> torch.Tensor:
    """Which of `sign_i (z_index_i - target_i) > 0` a partial search on `cut` (whose last
    block is ReLU `k`'s input) proves on the whole region by `until`: one term each."""
    device = target.device
    c = torch.zeros((len(index), 1, cut.blocks[-1].out_size), dtype=torch.float64,
                    device=device)
    c[torch.arange(len(index)), 0, index] = sign
    terms = Terms(c, (sign * target)[:, None], torch.ones((len(index), 1), dtype=torch.bool,
                                                          device=device))
    out = Search(cut, inputs, terms, 0.0, search, None, until,
                 Root(root.bounds[:k], root.slopes[:k]), partial=True).run()
    done = torch.ones(len(index), dtype=torch.bool, device=device)
    done[list(out.open_terms)] = False
    return done


def _moved(lo: torch.Tensor, up: torch.Tensor, index: torch.Tensor, sign: torch.Tensor,
           target: torch.Tensor, proven: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bounds with each proven `sign_i (z_index_i - target_i) > 0` applied: the upper
    bound lowered to the target where `sign < 0`, the lower one raised where `sign > 0`."""
    lo, up = lo.clone(), up.clone()
    top, bottom = proven & (sign < 0), proven & (sign > 0)
    up[index[top]] = torch.minimum(up[index[top]], target[top])
    lo[index[bottom]] = torch.maximum(lo[index[bottom]], target[bottom])
    return lo, up


def _reach(cut: Chain, inputs: InputSet, iterations: int, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attained extremes of each output neuron of `cut` over `inputs`: per neuron a
    signed-gradient ascent of `+z_j` and of `-z_j` (values reached, not bounds)."""
    n = cut.blocks[-1].out_size
    centre = inputs.centre
    dtype = centre.dtype
    start = torch.rand((2 * n, len(centre)), generator=generator, dtype=dtype,
                       device=centre.device) * 2 - 1
    x = _project(inputs, centre + start * _extent(inputs))
    sign = torch.cat([torch.ones(n, dtype=dtype), -torch.ones(n, dtype=dtype)]).to(centre.device)
    rows = torch.arange(2 * n, device=centre.device) % n
    best = torch.full((2 * n,), -torch.inf, dtype=dtype, device=centre.device)
    step = _extent(inputs) * 0.25
    for it in range(iterations + 1):
        x = x.detach().requires_grad_(it < iterations)
        with torch.set_grad_enabled(it < iterations):
            value = sign * cut.centres(x)[-1][torch.arange(2 * n, device=centre.device), rows]
        best = torch.maximum(best, value.detach())
        if it == iterations:
            break
        grad, = torch.autograd.grad(value.sum(), x)
        with torch.no_grad():
            x = _project(inputs, x + step * (1 - it / iterations) * _direction(inputs, grad))
    return -best[n:], best[:n]


def _extent(inputs: InputSet) -> torch.Tensor | float:
    return inputs.half if inputs.half is not None else inputs.radius / len(inputs.centre) ** 0.5


def _direction(inputs: InputSet, grad: torch.Tensor) -> torch.Tensor:
    if inputs.half is not None:
        return grad.sign()
    return grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-30) * len(inputs.centre) ** 0.5


def _project(inputs: InputSet, x: torch.Tensor) -> torch.Tensor:
    if inputs.half is not None:
        return torch.clamp(x, inputs.centre - inputs.half, inputs.centre + inputs.half)
    delta = x - inputs.centre
    norm = delta.norm(dim=1, keepdim=True)
    return inputs.centre + delta * (inputs.radius / norm.clamp_min(inputs.radius)).clamp(max=1)
