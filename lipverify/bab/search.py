"""Best-first branch and bound over ReLU splits, batched, warm-started from the parent.

The property is refuted when every term is: a term (rows `C_t y - d_t`) is refuted on a
sub-domain when one of its rows has a positive lower bound there. Each open sub-domain belongs to
one term; the worst-bounded ones are split first, each on its best-scored unstable neurons
(several at once while the batch is not full), and the children are bounded with their parent's
slopes and multipliers as the starting point of a few Adam steps. The two children of a split
cover their parent, so a term refuted on every leaf is refuted on the region.

A sub-domain counts as proven only after its bound is recomputed in float64 from the float32
search's parameters, less a rounding allowance and the caller's slack; one with every unstable
neuron split goes to `leaf` (exact LPs).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lipverify.bab.interm import Interm, refine
from lipverify.bab.optimise import Steps, optimise
from lipverify.bab.pool import Pool, Terms, first_split, layer_of, set_split, term_value
from lipverify.bab.relaxed import (
    InputSet,
    abs_chain,
    backward_bound,
    cast_chain,
    initial_slopes,
    outward,
    rounding_factor,
    split_bounds,
)
from lipverify.bab.root import Bounds, Root, root_relaxation
from lipverify.bab.scores import CANDIDATES, candidates
from lipverify.bounds.chain import Chain
from lipverify.network.layers import Conv
from lipverify.types import Status, deadline_passed

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SearchOptions:
    """Batch size, optimiser steps at the root and per batch, open-domain cap, dtype, how many
    candidates filtered branching tries, and `blend`: keep the split neurons' root relaxations,
    blended with the exact line by `tau` (never looser than the parent), instead of clamping
    their bounds at 0 as beta-CROWN does. Clamping is the default: on five hard mnist_fc
    instances at 60 s it bounded 5-60 % more sub-domains, and on one it left 4 times fewer
    open. `refine`: each sub-domain's own pre-activation bounds (None: on chains without
    convolutions); `layer_trials`: how many of a batch's worst domains also try each ReLU's
    best neuron; `trust_fast`: the float32 bounds' own allowance is proof (None: dense chains
    on the CPU)."""

    batch: int = 1024
    root_steps: Steps = Steps(iterations=60, target=0.0)
    steps: Steps = Steps(iterations=10, target=0.0)
    interm_steps: Steps = Steps(iterations=20)
    max_domains: int = 200_000
    max_depth: int = 8
    filtered: int = 3
    blend: bool = False
    refine: bool | None = None
    layer_trials: int = 64
    trust_fast: bool | None = None
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class Outcome:
    """How a search ended: VERIFIED, UNKNOWN or TIMEOUT, the smallest proven lower bound of the
    property (the root's bound when not verified), sub-domains bounded, why not, and the terms
    not refuted (each term absent from `open_terms` is refuted on the whole region)."""

    status: Status
    margin: float
    domains: int
    reason: str = ""
    seconds: float = 0.0
    open_terms: tuple[int, ...] = ()


# the exact value of one term on a fully split sub-domain: (the search's root bounds, the
# sub-domain's splits, the term)
Leaf = Callable[[Bounds, list[torch.Tensor], int], float]


class Search:
    """One input's branch and bound (`run`), on a float64 chain and its fast copy.

    `root`: sound pre-activation bounds to start from (default: `root_relaxation`'s).
    `partial`: refute as many terms as possible: a term whose fully split sub-domain is not
    proven is given up (it stays in `Outcome.open_terms`) instead of ending the search, and
    the domains closest to proven are split first."""

    def __init__(self, chain: Chain, inputs: InputSet, terms: Terms, slack: float,
                 options: SearchOptions, leaf: Leaf | None = None,
                 deadline: float | None = None, root: Root | None = None,
                 partial: bool = False) -> None:
        self.chain, self.inputs, self.terms, self.slack = chain, inputs, terms, slack
        self.options, self.leaf, self.deadline = options, leaf, deadline
        self.given, self.partial = root, partial
        device = inputs.centre.device
        self.device = device
        self.fast_chain = cast_chain(chain, options.dtype, device)
        self.fast_inputs = inputs.to(options.dtype, device)
        self.fast_terms = Terms(terms.c.to(options.dtype), terms.d.to(options.dtype),
                                terms.valid)
        self.magnitudes = abs_chain(chain)
        self.fast_magnitudes = abs_chain(self.fast_chain)
        self.fast_unit = torch.finfo(options.dtype).eps / 2
        convolutions = any(isinstance(layer, Conv) for block in chain.blocks
                           for layer in block.layers)
        # The float32 bounds' own allowance is proof only for dense layers on the CPU (BLAS
        # rounds componentwise). A GPU may run float32 as TF32, and a float32 convolution
        # may take Winograd or FFT: there the proof recomputes every bound in float64.
        self.trust_fast = (device.type == "cpu" and not convolutions) \
            if options.trust_fast is None else options.trust_fast
        # Own bounds per sub-domain pay on dense chains (mnist_fc 256x4 prop_3_0.05: 29 s
        # instead of a timeout at 300 s); on oval21's convnets, thousands of unstable
        # neurons make them cost more than they save (cifar_base img8194: 16 s without,
        # timeout at 60 s with), so by default they are for chains without convolutions.
        self.refine = not convolutions if options.refine is None else options.refine
        self.visited = 0

    # -- bounds -------------------------------------------------------------------------
    def _bounds(self, pool: Pool, interm: Interm | None = None) -> Bounds:
        """The pre-activation bounds the relaxation uses on each domain: its own, as they are
        (blended split relaxations) or clamped at 0 by the splits (beta-CROWN's). `interm`
        gives the other neurons' (default: the float32 search's)."""
        full = (interm or self.interm).full(pool.lower, pool.upper)
        return full if self.options.blend else split_bounds(full, pool.splits)

    def _tau(self, tau: list[torch.Tensor]) -> list[torch.Tensor] | None:
        return tau if self.options.blend else None

    def _fast_bound(self, pool: Pool, steps: Steps):
        """Optimised float32 bounds of the pool's domains: (value (B,), Best)."""
        bounds = self._bounds(pool)
        c, d = self.fast_terms.c[pool.term], self.fast_terms.d[pool.term]
        valid = self.terms.valid[pool.term]
        relus = len(bounds)

        def bound(alpha, beta):
            return backward_bound(self.fast_chain, bounds, pool.splits, alpha[:relus], beta, c,
                                  d, self.fast_inputs, tau=self._tau(alpha[relus:]))

        best = optimise(bound, pool.alpha, pool.beta, steps,
                        stop=lambda v: bool((term_value(v, valid) > 0).all()))
        self.visited += len(pool)
        return term_value(best.value, valid), best, bounds

    def _proven(self, pool: Pool) -> torch.Tensor:
        """Float64 values of the pool's domains at their parameters, less rounding and slack:
        their pre-activation bounds recomputed in float64 (sound), then the rows."""
        if self.trust_fast:  # the search's own bounds carry their float32 allowance
            lower, upper = [lo.double() for lo in pool.lower], [up.double() for up in pool.upper]
        else:
            lower, upper = self.sound.start(len(pool))
            if self.refine:
                refine(self.chain, self.inputs, self.sound, lower, upper, pool.splits,
                       first_split(pool.splits), self.magnitudes, deadline=self.deadline)
        sound_pool = Pool(pool.splits, pool.alpha, pool.beta, pool.value, pool.term, pool.cand,
                          lower, upper)
        bounds = self._bounds(sound_pool, self.sound)
        c, d = self.terms.c[pool.term], self.terms.d[pool.term]
        relus = len(bounds)
        params = [a.double() for a in pool.alpha]
        with torch.no_grad():
            value, _, size = backward_bound(self.chain, bounds, pool.splits, params[:relus],
                                            [b.double() for b in pool.beta], c, d, self.inputs,
                                            magnitudes=self.magnitudes,
                                            tau=self._tau(params[relus:]))
        rows = value - rounding_factor(self.chain) * size
        return term_value(rows, self.terms.valid[pool.term]) - self.slack

    # -- the search ---------------------------------------------------------------------
    def run(self) -> Outcome:
        start = time.perf_counter()
        opts = self.options
        relaxation = self.given or root_relaxation(self.chain, self.inputs, opts.interm_steps,
                                                   opts.dtype, self.deadline, self.magnitudes)
        self.root = relaxation.bounds
        self.fast_root = [(lo[None], up[None]) for lo, up in outward(self.root, opts.dtype)]
        self.unstable = [(lo < 0) & (up > 0) for lo, up in self.root]
        self.sound = Interm.of([(lo[None], up[None]) for lo, up in self.root],
                               relaxation.slopes)
        self.interm = Interm(self.fast_root, self.sound.index, self.sound.slopes)
        self.offsets = torch.tensor([0, *(len(lo) for lo, _ in self.root)],
                                    device=self.device).cumsum(0)
        present = torch.nonzero(self.terms.valid.any(dim=1)).flatten()
        count, rows = len(present), self.terms.c.shape[1]
        if not count:
            return Outcome(Status.VERIFIED, math.inf, 0, seconds=time.perf_counter() - start)
        splits = [torch.zeros((count, len(lo)), dtype=torch.int8, device=lo.device)
                  for lo, _ in self.root]
        alpha = [a.to(opts.dtype).expand(count, -1, -1).clone()
                 for a in initial_slopes([(lo[None], up[None]) for lo, up in self.root], rows)]
        beta = [torch.zeros_like(a) for a in alpha]
        if opts.blend:
            alpha = alpha + [torch.zeros_like(a) for a in alpha]  # then tau
        start_value = torch.full((count,), -math.inf, dtype=opts.dtype, device=self.device)
        pool = Pool(splits, alpha, beta, start_value, present,
                    torch.zeros((count, 0), dtype=torch.long, device=self.device),
                    *self.interm.start(count))
        pool, least = self._bound_children(pool, opts.root_steps)
        root_margin = float(pool.value.min()) if len(pool) else least
        log.debug("bab root: margin %.4g, %d terms open, %.1f s", root_margin, len(pool),
                  time.perf_counter() - start)
        failed: set[int] = set()  # terms given up (partial)
        while len(pool):
            if failed:
                dropped = torch.tensor(sorted(failed), device=self.device)
                pool = pool.take(torch.nonzero(~torch.isin(pool.term, dropped)).flatten())
                if not len(pool):
                    break
            if deadline_passed(self.deadline):
                return self._end(Status.TIMEOUT, root_margin, "out of time", start, pool,
                                 failed)
            if len(pool) > opts.max_domains:
                return self._end(Status.UNKNOWN, root_margin,
                                 f"more than {opts.max_domains} open sub-domains", start, pool,
                                 failed)
            order = torch.argsort(pool.value, descending=self.partial)
            half = max(1, opts.batch // 2)
            picked, rest = pool.take(order[:half]), pool.take(order[half:])
            leaves = (picked.cand[:, 0] < 0) if picked.cand.shape[1] else \
                torch.ones(len(picked), dtype=torch.bool, device=self.device)
            for b in torch.nonzero(leaves).flatten().tolist():
                value = self._leaf_value(picked.take(torch.tensor([b], device=self.device)))
                if not value > 0 and self.partial:
                    failed.add(int(picked.term[b]))
                    continue
                if not value > 0:
                    return self._end(Status.UNKNOWN, root_margin,
                                     "a sub-domain with every ReLU fixed is not proven", start,
                                     pool)
                least = min(least, value)
            picked = picked.take(torch.nonzero(~leaves).flatten())
            if len(picked):
                children = self._split(picked)
                children, low = self._bound_children(children, opts.steps)
                least = min(least, low)
                pool = Pool.cat([children, rest]) if len(rest) else children
            else:
                pool = rest
            log.debug("bab: %d bounded, %d open, worst %.4g, %.1f s", self.visited, len(pool),
                      float(pool.value.min()) if len(pool) else math.inf,
                      time.perf_counter() - start)
        if failed:
            return self._end(Status.UNKNOWN, root_margin,
                             "a sub-domain with every ReLU fixed is not proven", start,
                             failed=failed)
        return self._end(Status.VERIFIED, least, "", start)

    def _end(self, status: Status, margin: float, reason: str, start: float,
             pool: Pool | None = None, failed: set[int] | frozenset[int] = frozenset()
             ) -> Outcome:
        """The outcome; `pool` (still open) and `failed` (given up) name the open terms."""
        still = set(pool.term.tolist()) if pool is not None else set()
        return Outcome(status, margin, self.visited, reason, time.perf_counter() - start,
                       tuple(sorted(still | failed)))

    def _bound_children(self, pool: Pool, steps: Steps) -> tuple[Pool, float]:
        """Bound the domains; return those left open (with their candidates) and the smallest
        proven value among the rest (+inf when none)."""
        value, best, bounds = self._fast_bound(pool, steps)
        value = torch.maximum(value, pool.value)
        pool = Pool(pool.splits, best.alpha, best.beta, value, pool.term, pool.cand,
                    pool.lower, pool.upper)
        done = value > 0
        least = math.inf
        if done.any():
            idx = torch.nonzero(done).flatten()
            sound = self._proven(pool.take(idx))
            ok = sound > 0
            if ok.any():
                least = float(sound[ok].min())
            failed = idx[~ok]
            value[failed] = sound[~ok].to(value.dtype).clamp(max=0)
            done[failed] = False
        open_idx = torch.nonzero(~done).flatten()
        left = pool.take(open_idx)
        left.value = value[open_idx]
        left.cand = candidates(left, [(lo if len(lo) == 1 else lo[open_idx],
                                       up if len(up) == 1 else up[open_idx])
                                      for lo, up in bounds],
                               [c[open_idx] for c in best.coefs], best.value[open_idx],
                               self.terms.valid, self.unstable)
        return left, least

    def _choose(self, pool: Pool) -> Pool:
        """Filtered smart branching: of each domain's `options.filtered` best-scored
        candidates (and, with `refine`, for the `options.layer_trials` worst domains each
        ReLU's best too), move to the front the one whose worse child bounds best (one pass
        at the parent's parameters, after the children's own pre-activation bounds: what
        makes an early split pay off)."""
        opts = self.options
        columns = list(range(min(opts.filtered, CANDIDATES)))
        if not self.refine or not opts.layer_trials:
            return self._choose_among(pool, columns)
        worst = torch.argsort(pool.value)
        head = self._choose_among(pool.take(worst[:opts.layer_trials]),
                                  columns + list(range(CANDIDATES, pool.cand.shape[1])))
        if len(pool) <= opts.layer_trials:
            return head
        return Pool.cat([head, self._choose_among(pool.take(worst[opts.layer_trials:]),
                                                  columns)])

    def _choose_among(self, pool: Pool, columns: list[int]) -> Pool:
        """`_choose` over the candidates in `columns` of `pool.cand`."""
        if len(columns) <= 1 or not len(pool):
            return pool
        k, count = len(columns), len(pool)
        trials = [pool.take(torch.arange(count, device=self.device)) for _ in range(2 * k)]
        for j, col in enumerate(columns):
            for half, sign in enumerate((-1, 1)):
                set_split(trials[2 * j + half], pool.cand[:, col].contiguous(), sign,
                          self.offsets)
        every = Pool.cat(trials)
        # trials of one domain side by side, so that refinement chunks share their rows
        order = torch.arange(2 * k * count, device=self.device).reshape(2 * k, count).T
        every = every.take(order.reshape(-1))
        if self.refine:
            flat = pool.cand[:, columns].T.reshape(-1)
            first = torch.where(flat >= 0, layer_of(flat, self.offsets),
                                torch.full_like(flat, len(self.root)))
            first = first.reshape(k, 1, count).expand(k, 2, count).reshape(2 * k, count)
            refine(self.fast_chain, self.fast_inputs, self.interm, every.lower, every.upper,
                   every.splits, first.T.reshape(-1), deadline=self.deadline)
        relus = len(self.root)
        with torch.no_grad():
            rows, _, _ = backward_bound(self.fast_chain,
                                        self._bounds(every),
                                        every.splits, every.alpha[:relus], every.beta,
                                        self.fast_terms.c[every.term],
                                        self.fast_terms.d[every.term], self.fast_inputs,
                                        tau=self._tau(every.alpha[relus:]))
        value = term_value(rows, self.terms.valid[every.term]).reshape(count, k, 2)
        value = value.permute(1, 2, 0)  # (k, 2, B)
        score = value.min(dim=1).values  # (k, B)
        chosen = pool.cand[:, columns].T  # (k, B)
        score = torch.where(chosen >= 0, score, torch.full_like(score, -math.inf))
        pick = chosen.gather(0, score.argmax(dim=0)[None])[0]
        cand = pool.cand.clone()
        head, old = cand[:, :CANDIDATES], pool.cand[:, 0]
        there = head == pick[:, None]  # where the pick already is: the old first goes there
        head[there] = old.repeat_interleave(there.sum(dim=1))
        head[:, 0] = pick
        pool.cand = cand
        return pool

    def _split(self, pool: Pool) -> Pool:
        """Children of each domain split on its best candidates (2^depth each), inheriting the
        parent's parameters and bound; a new split's multiplier starts at 0."""
        opts = self.options
        pool = self._choose(pool)
        depth = max(1, int(math.log2(max(opts.batch, 2) / len(pool))))
        depth = min(depth, opts.max_depth,
                    int((pool.cand[:, :CANDIDATES] >= 0).sum(dim=1).min()))
        for i in range(depth):
            every = torch.arange(len(pool), device=self.device)
            low, high = pool.take(every), pool.take(every)
            set_split(low, pool.cand[:, i].contiguous(), -1, self.offsets)
            set_split(high, pool.cand[:, i].contiguous(), 1, self.offsets)
            pool = Pool.cat([low, high])
        if self.refine:
            new = layer_of(pool.cand[:, :depth], self.offsets)
            refine(self.fast_chain, self.fast_inputs, self.interm, pool.lower, pool.upper,
                   pool.splits, new.min(dim=1).values, self.fast_magnitudes, self.fast_unit,
                   self.deadline)
        return pool

    def _leaf_value(self, pool: Pool) -> float:
        """Exact value of a domain whose root-unstable neurons are all split (LPs)."""
        if self.leaf is None:
            return math.nan
        return self.leaf(self.root, [s[0] for s in pool.splits], int(pool.term[0])) - self.slack
