"""The `bab` backend: branch and bound on ReLU splits (`lipverify.bab` on ReLU chains, else
auto_LiRPA's CROWN bounds).

Bunel et al., "Branch and Bound for Piecewise Linear Neural Network Verification", JMLR 2020
(BaBSR branching); Xu et al., "Fast and Complete", ICLR 2021 (linear-relaxation bounds on
batches of sub-domains). A sub-domain fixes some unstable ReLUs active (`z >= 0`) or inactive
(`z <= 0`); the two children of a split cover their parent, so a property that holds on every
leaf holds on the region. Each batch of sub-domains is bounded in one CROWN pass with the split
neurons' input bounds clamped at 0 and later layers' bounds recomputed under them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from lipverify.bab.optimise import Steps
from lipverify.bab.problem import chain_of, input_set, leaf_region, terms_of
from lipverify.bab.relaxed import cast_chain
from lipverify.bab.schedule import solve
from lipverify.bab.search import SearchOptions
from lipverify.backends._leaf_lp import leaf_lower_bounds, relu_layers
from lipverify.backends._lirpa_adapter import DTYPE, LirpaAdapter, LirpaOptions, _help
from lipverify.backends._margin_search import Outcomes, Region, Spec
from lipverify.backends.lirpa import LirpaBackend
from lipverify.errors import BackendUnavailable, ModelError
from lipverify.bounds.chain import Chain
from lipverify.network.layers import Activation
from lipverify.network.network import Network
from lipverify.types import Certificate, Problem, Status, deadline_passed

log = logging.getLogger(__name__)

Bounds = list[tuple[torch.Tensor, torch.Tensor]]
EMPTY_TOL = 1e-9  # relative: bounds crossing by more than float64 rounding mean an empty domain


@dataclass(frozen=True)
class BabOptions(LirpaOptions):
    """Options of the `bab` backend (the auto_LiRPA ones, plus the search's limits)."""

    domains_per_batch: int = _help(1024, "Sub-domains bounded per CROWN pass.")
    max_domains: int = _help(200_000, "Open sub-domains at most (then the input is unknown).")
    beta_iterations: int = _help(20, "beta-CROWN steps per batch of sub-domains (0: CROWN "
                                     "bounds only, with the parent's slopes).")
    beta_lr: float = _help(0.05, "Adam learning rate of the split multipliers (0: no beta, "
                                 "alpha-CROWN only).")
    time_per_input: float | None = _help(30.0, "Seconds of branching per input (none: until "
                                               "the problem's deadline or `timeout`).")
    tighten: float = _help(0.0, "Share of each input's time first spent proving deep neurons "
                                "stable by partial searches on the cut chain "
                                "(lipverify.bab.tighten); 0: off.")
    tighten_after: float = _help(10.0, "Seconds of plain search before tightening (an input "
                                       "it decides is not tightened); 0: tighten first.")


@dataclass(frozen=True)
class SearchResult:
    """How one input's branch and bound ended."""

    status: Status  # VERIFIED, UNKNOWN or TIMEOUT
    margin: float  # a sound lower bound of the margin over the region
    domains: int  # sub-domains bounded
    reason: str = ""


def _intercepts(bounds: Bounds) -> list[torch.Tensor]:
    """Per layer the upper relaxation's offset `-u l / (u - l)` on unstable neurons, else 0."""
    out = []
    for lo, up in bounds:
        unstable = (lo < 0) & (up > 0)
        width = torch.where(unstable, up - lo, torch.ones_like(up))
        out.append(torch.where(unstable, -up * lo / width, torch.zeros_like(up)))
    return out


def branching_scores(bounds: Bounds, coeffs: list[torch.Tensor],
                     rows: torch.Tensor) -> torch.Tensor:
    """BaBSR-style scores `(B, sum n)` of splitting each neuron (-inf where stable).

    For the row `rows[b]` of domain `b`, an unstable neuron whose output has a negative
    coefficient `a` costs the bound `-a * (-u l / (u - l))` through its upper relaxation:
    splitting it removes that loss. Unstable neurons with `a >= 0` get a small positive score
    (ties broken by their relaxation's size) so that every unstable neuron can be chosen.
    """
    parts = []
    batch = torch.arange(len(rows))
    for (lo, up), a, offset in zip(bounds, coeffs, _intercepts(bounds), strict=True):
        coef = a[rows, batch]  # (B, n)
        score = torch.relu(-coef) * offset + 1e-9 * offset
        parts.append(torch.where((lo < 0) & (up > 0), score, torch.full_like(score, -np.inf)))
    return torch.cat(parts, dim=1)


def split(bounds: Bounds, choice: torch.Tensor) -> Bounds:
    """The children of each domain split at flat neuron `choice[b]`: inactive ones first.

    Returns `2B` domains: `b` with `z <= 0` (upper clamped at 0) and `B + b` with `z >= 0`.
    """
    out = []
    start = 0
    rows = torch.arange(len(choice))
    for lo, up in bounds:
        n = lo.shape[1]
        local = choice - start
        mine = (local >= 0) & (local < n)
        at = local.clamp(0, n - 1)
        lo_off, up_off = lo.clone(), up.clone()
        up_off[rows[mine], at[mine]] = torch.minimum(up[rows[mine], at[mine]],
                                                     torch.zeros_like(at[mine], dtype=up.dtype))
        lo_on, up_on = lo.clone(), up.clone()
        lo_on[rows[mine], at[mine]] = torch.maximum(lo[rows[mine], at[mine]],
                                                    torch.zeros_like(at[mine], dtype=lo.dtype))
        out.append((torch.cat([lo_off, lo_on]), torch.cat([up_off, up_on])))
        start += n
    return out


def split_constraints(bounds: Bounds, unstable: list[torch.Tensor]
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per activation the sub-domains' split constraints `sign * z[index] >= 0`, `(B, S)`.

    A neuron unstable at the root but fixed in a sub-domain (by a split or by the bounds
    recomputed under the splits) is constrained: `+1` when its lower bound is >= 0, `-1` when
    its upper bound is <= 0. Rows with fewer constraints are padded with sign 0 (no term).
    """
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for (lo, up), root in zip(bounds, unstable, strict=True):
        on, off = root & (lo >= 0), root & (up <= 0) & ~(lo >= 0)
        # At least one (padding) entry: auto_LiRPA expects a multiplier on every activation.
        count = max(1, int((on | off).sum(dim=1).max()) if len(lo) else 0)
        order = torch.argsort((on | off).to(torch.int8), dim=1, descending=True, stable=True)
        index = order[:, :count].contiguous()
        sign = on.gather(1, index).to(lo.dtype) - off.gather(1, index).to(lo.dtype)
        out.append((index, sign))
    return out


class BabBackend(LirpaBackend):
    """Branch and bound on ReLU splits, each sub-domain bounded by alpha/beta-CROWN.

    Proves, per input, that every property term is refuted on each leaf of a split tree whose
    leaves cover the region (L-infinity or L2 ball, or box): verified is sound whatever the
    branching. On a ReLU chain (dense and convolution blocks between ReLUs) the search is
    `lipverify.bab`: optimised root bounds, batched sub-domains warm-started from their parent,
    filtered smart branching, every proven leaf re-checked in float64 with a proven rounding
    allowance. Other ReLU networks take the auto_LiRPA path (`search`). A leaf whose ReLUs are
    all fixed is decided by exact LPs. Cost: 20 Adam steps per batch of 1024 sub-domains, until
    the time per input runs out (48: after the local bounds, before LipSDP).

    Args:
        options: `BabOptions` (domains per batch, most open domains, seconds per input).
    """

    name: ClassVar[str] = "bab"
    cost: ClassVar[int] = 48
    Options: ClassVar[type] = BabOptions

    def supports(self, network: Network, problem: Problem) -> str | None:
        """None when auto_LiRPA bounds the network and every activation is a ReLU."""
        why = super().supports(network, problem)
        if why:
            return why
        kinds = {type(a).__name__ for a in self.adapter(network).activations}
        if kinds - {"BoundRelu"}:
            return f"bab splits ReLUs only (this network has {', '.join(sorted(kinds))})"
        return None

    def adapter(self, network: Network, deadline: float | None = None) -> LirpaAdapter:
        """The adapter, on the module rebuilt from the layer view when that is a ReLU chain
        (so that its activations are the layer view's, which the leaf LPs read)."""
        key = network.fingerprint
        if key not in self._adapters and relu_layers(network.layers) is not None:
            try:
                self._adapters[key] = LirpaAdapter(network, self.options, use_layers=True,
                                                   method=self.method, deadline=deadline)
            except (ModelError, BackendUnavailable):
                pass  # the parent builds from the module, or records why not
        return super().adapter(network, deadline)

    def certify(self, network: Network, problem: Problem) -> list[Certificate]:
        """One certificate per input: verified when every leaf of its split tree is."""
        start = time.perf_counter()
        deadline, adapter, facts = self._start(network, problem)
        region, spec, slack, violated, centre = (facts.region, facts.spec, facts.slack,
                                                 facts.violated, facts.centre)
        n = len(problem)
        chain = chain_of(network)
        results: list[SearchResult | None] = [None] * n
        for i in range(n):
            if violated[i] or adapter is None or deadline_passed(deadline):
                continue
            own = deadline
            if self.options.time_per_input is not None:
                own = min(d for d in (deadline, time.monotonic() + self.options.time_per_input)
                          if d is not None)
            index = np.array([i])
            if chain is not None:
                # The chain search proves each bound with its own rounding allowance (every
                # float64 step charged against its magnitudes, `lipverify.bab.relaxed`), so
                # the centre-based slack, sized for auto_LiRPA's unanalysed bounds, is not used.
                results[i] = self.chain_search(network, chain, region.subset(index),
                                               spec.subset(index), 0.0, own)
            else:
                results[i] = self.search(adapter, region.subset(index), spec.subset(index),
                                         float(slack[i]), own)
        margin = np.array([r.margin if r else np.nan for r in results])
        verified = np.array([bool(r and r.status == Status.VERIFIED) for r in results])
        eps = problem.perturbation.eps
        outcomes = Outcomes(centre, slack, margin, np.where(verified, eps, 0.0), verified,
                            False, confirmed=violated)
        seconds = (time.perf_counter() - start) / max(n, 1)
        certs = outcomes.certificates(self.name, region.centres, seconds,
                                      {"method": "BaB (CROWN bounds, ReLU splits)"})
        out = []
        for cert, res in zip(certs, results, strict=True):
            if cert.status == Status.UNKNOWN:
                late = res is None or res.status == Status.TIMEOUT
                info = {**cert.details, **({"domains": res.domains, "reason": res.reason}
                                           if res else {})}
                cert = dataclasses.replace(cert, status=Status.TIMEOUT if late else cert.status,
                                           details=info)
            elif res is not None:
                cert = dataclasses.replace(cert, details={**cert.details,
                                                          "domains": res.domains})
            out.append(cert)
        return out

    def chain_search(self, network: Network, chain: Chain, region: Region, spec: Spec,
                     slack: float, deadline: float | None) -> SearchResult:
        """Branch and bound for one input on the network's ReLU chain (`lipverify.bab`)."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        inputs = input_set(region, device)
        terms = terms_of(spec, device)
        opts = self.options
        search_opts = SearchOptions(batch=opts.domains_per_batch, max_domains=opts.max_domains,
                                    steps=Steps(iterations=max(opts.beta_iterations, 0),
                                                lr_beta=opts.beta_lr, target=0.0))
        layers = relu_layers(network.layers)

        def leaf(root: Bounds, splits: list[torch.Tensor], term: int) -> float:
            if layers is None:
                return float("nan")
            active = [((lo >= 0) | (s > 0)).cpu().numpy() for (lo, _), s in zip(root, splits)]
            constrained = [((lo < 0) & (up > 0)).cpu().numpy() for lo, up in root]
            keep = terms.valid[term].cpu().numpy()
            rows, _ = leaf_lower_bounds(layers, active, constrained, leaf_region(region),
                                        terms.c[term].cpu().numpy()[keep],
                                        terms.d[term].cpu().numpy()[keep])
            return float(rows.max())

        out = solve(cast_chain(chain, torch.float64, device), inputs, terms, slack, search_opts,
                    leaf, deadline, opts.tighten, opts.tighten_after)
        return SearchResult(out.status, out.margin, out.domains, out.reason)

    def search(self, adapter: LirpaAdapter, region: Region, spec: Spec, slack: float,
               deadline: float | None) -> SearchResult:
        """Branch and bound for one input (`region` and `spec` of length 1)."""
        c_one = torch.as_tensor(spec.c, dtype=DTYPE, device=adapter.device)
        d_one = spec.d

        def combine(rows: np.ndarray) -> np.ndarray:
            """Per domain the property's value from its row bounds `(count, rows)`."""
            count = len(rows)
            return Spec(np.repeat(spec.c, count, 0), np.repeat(d_one, count, 0),
                        np.repeat(spec.fill, count, 0), spec.terms,
                        spec.rows).combine(rows) - slack

        def evaluate(count: int, bounds: Bounds | None):
            c = c_one.expand(count, -1, -1)
            lower, new, coeffs = adapter.split_bounds(region.subset(np.zeros(count, int)), c,
                                                      bounds)
            rows = lower.cpu().numpy() - d_one
            worst = _worst_rows(rows, spec)
            value = np.where(_empty(new, count), np.inf, combine(rows))
            return value, new, coeffs, torch.as_tensor(worst)

        def tighten(value: np.ndarray, bounds: Bounds) -> np.ndarray:
            """`value` raised by beta-CROWN on the domains CROWN left unproven."""
            todo = np.flatnonzero(~(value > 0))
            if self.options.beta_iterations <= 0 or not len(todo) or not bounds:
                return value
            pick = torch.as_tensor(todo)
            sub = [(lo[pick], up[pick]) for lo, up in bounds]
            lower = adapter.beta_bounds(region.subset(np.zeros(len(todo), int)),
                                        c_one.expand(len(todo), -1, -1), sub,
                                        split_constraints(sub, unstable),
                                        self.options.beta_iterations, deadline)
            out = value.copy()
            out[todo] = np.maximum(value[todo], combine(lower.cpu().numpy() - d_one))
            return out

        value, bounds, coeffs, worst = evaluate(1, None)
        visited = 1
        if value[0] > 0:
            return SearchResult(Status.VERIFIED, float(value[0]), visited)
        root = float(value[0])
        scores = branching_scores(bounds, coeffs, worst)
        unstable = [(lo < 0) & (up > 0) for lo, up in bounds]  # the root's: leaves' half-spaces
        least = np.inf  # the smallest bound of a proven leaf
        half = max(1, self.options.domains_per_batch // 2)
        while len(scores):
            if deadline_passed(deadline):
                return SearchResult(Status.TIMEOUT, root, visited, "out of time")
            take = min(half, len(scores))
            if scores.shape[1]:
                best, choice = scores[:take].max(dim=1)
            else:  # no activation at all: the network is affine on the whole region
                best = torch.full((take,), -np.inf, dtype=scores.dtype)
                choice = torch.zeros(take, dtype=torch.long)
            fixed = ~torch.isfinite(best)
            for b in np.flatnonzero(fixed.numpy()):  # every ReLU fixed: the network is affine
                value = _leaf_value(adapter, [(lo[b], up[b]) for lo, up in bounds], unstable,
                                    region, spec, slack)
                visited += 1
                if not value > 0:
                    return SearchResult(Status.UNKNOWN, root, visited,
                                        "a sub-domain with every ReLU fixed is not proven"
                                        + ("" if np.isfinite(value) else " (no leaf LP)"))
                least = min(least, value)
            split_rows = torch.as_tensor(np.flatnonzero(~fixed.numpy()))
            rest = slice(take, None)
            kept_bounds: Bounds = [(lo[rest], up[rest]) for lo, up in bounds]
            kept_scores = scores[rest]
            if len(split_rows):
                children = split([(lo[split_rows], up[split_rows]) for lo, up in bounds],
                                 choice[split_rows])
                value, new, coeffs, worst = evaluate(2 * len(split_rows), children)
                visited += len(value)
                value = tighten(value, new)
                done = value > 0
                if done.any():
                    least = min(least, float(value[done].min()))
                keep = torch.as_tensor(np.flatnonzero(~done))
                kept_bounds = [(torch.cat([lo[keep], old_lo]), torch.cat([up[keep], old_up]))
                               for (lo, up), (old_lo, old_up) in zip(new, kept_bounds,
                                                                     strict=True)]
                kept_scores = torch.cat([branching_scores([(lo[keep], up[keep]) for lo, up in new],
                                                          [a[:, keep] for a in coeffs],
                                                          worst[keep]), kept_scores])
            bounds, scores = kept_bounds, kept_scores
            log.debug("bab: %d sub-domains bounded, %d open", visited, len(scores))
            if len(scores) > self.options.max_domains:
                return SearchResult(Status.UNKNOWN, root, visited,
                                    f"more than {self.options.max_domains} open sub-domains")
        return SearchResult(Status.VERIFIED, least, visited)


def _empty(bounds: Bounds, count: int) -> np.ndarray:
    """Per domain, whether some neuron's lower bound exceeds its upper one beyond rounding:
    no point of the region satisfies the domain's splits (nothing there to refute)."""
    gap = [(lo - up - EMPTY_TOL * (1 + lo.abs() + up.abs())).amax(dim=1) for lo, up in bounds]
    return (torch.stack(gap).amax(dim=0) > 0).cpu().numpy() if gap else np.zeros(count, bool)


def _leaf_value(adapter: LirpaAdapter, bounds: Bounds, unstable: list[torch.Tensor],
                region: Region, spec: Spec, slack: float) -> float:
    """A sound lower bound of the property's value on a sub-domain with every ReLU fixed (by
    the leaf LPs), NaN when the network is not a ReLU chain of the layer view."""
    layers = relu_layers(adapter.network.layers)
    if layers is None or adapter.source != "layers":
        return float("nan")
    sizes = [int(np.prod(layer.in_shape)) for layer in layers if isinstance(layer, Activation)]
    if sizes != [len(lo) for lo, _ in bounds]:
        return float("nan")
    active = [(lo >= 0).cpu().numpy() for lo, _ in bounds]
    constrained = [u[0].cpu().numpy() for u in unstable]
    rows, _ = leaf_lower_bounds(layers, active, constrained, leaf_region(region), spec.c[0],
                                spec.d[0])
    return float(spec.combine(rows[None])[0]) - slack


def _worst_rows(rows: np.ndarray, spec: Spec) -> np.ndarray:
    """Per domain the row to branch for: the best row of its hardest unrefuted term."""
    vals = np.where(np.isnan(spec.fill[:1]), rows, np.broadcast_to(spec.fill[:1], rows.shape))
    per = vals.reshape(len(rows), spec.terms, spec.rows)
    term = per.max(axis=2).argmin(axis=1)
    row = per[np.arange(len(rows)), term].argmax(axis=1)
    return term * spec.rows + row
