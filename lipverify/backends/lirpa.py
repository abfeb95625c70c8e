"""The `lirpa` and `alpha-crown` backends: linear relaxation bounds through auto_LiRPA.

The network-facing work (regions to perturbations, batching under a memory budget, deadlines)
is `_lirpa_adapter.LirpaAdapter`; these backends turn its bounds into certificates.
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import numpy as np

from lipverify.backends._lirpa_adapter import (
    LirpaAdapter,
    LirpaOptions,
    Method,
    OutOfTime,
    parse_method,
)
from lipverify.backends._lirpa_compat import (
    MODULE,
    lirpa_availability,
)
from lipverify.backends._margin_search import (
    CentreFacts,
    Outcomes,
    Region,
    Spec,
    bisect_radius,
    deadline_of,
    first_radius,
)
from lipverify.backends.base import BackendBase
from lipverify.errors import (
    BackendUnavailable,
    LipverifyError,
    ModelError,
)
from lipverify.network.network import Network
from lipverify.types import Certificate, Norm, Problem, Scope, deadline_passed

log = logging.getLogger(__name__)


class LirpaBackend(BackendBase):
    """Linear relaxation based perturbation analysis (CROWN) through auto_LiRPA.

    Xu et al., "Automatic Perturbation Analysis for Scalable Certified Robustness and Beyond",
    NeurIPS 2020 (https://arxiv.org/abs/2002.12920); Zhang et al., "Efficient Neural Network
    Robustness Certification with General Activation Functions", NeurIPS 2018 (CROWN,
    https://arxiv.org/abs/1811.00866).

    Proves, per input, a lower bound on every property margin over the L2 or L-infinity ball
    (or box): sound, local scope. Verified when every bound is positive (auto_LiRPA runs in
    float64, less an allowance for its rounding); with `problem.want_radius`, the certified
    radius is found by a bisection run on all inputs at once with per-input radii. Inputs whose centre already violates the
    property are falsified with the centre as counterexample. Cost: one backward bound pass per
    input and bisection step (30 in the cascade).

    Args:
        options: `LirpaOptions` (method, batch size, memory budget, radius tolerance, alpha).

    Example:
        >>> from lipverify.backends.lirpa import LirpaBackend
        >>> LirpaBackend().name, LirpaBackend().cost
        ('lirpa', 30)
    """

    name: ClassVar[str] = "lirpa"
    cost: ClassVar[int] = 30
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2, Norm.LINF})
    scopes: ClassVar[frozenset[Scope]] = frozenset({Scope.LOCAL})
    sound: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = (MODULE,)
    Options: ClassVar[type] = LirpaOptions
    default_method: ClassVar[Method] = Method.CROWN

    def __init__(self, options: LirpaOptions | None = None) -> None:
        super().__init__(options)
        self._method = parse_method(self.options.method, self.default_method)
        self._adapters: dict[str, LirpaAdapter | str] = {}

    @property
    def method(self) -> Method:
        """The bound method this instance runs."""
        return self._method

    def availability(self) -> str | None:
        """None when auto_LiRPA loads here, else why not."""
        return super().availability() or lirpa_availability()

    def adapter(self, network: Network, deadline: float | None = None) -> LirpaAdapter:
        """The adapter of `network` (built once per network content).

        Raises `OutOfTime` (and builds again next time) when `deadline` passes during the build.
        """
        key = network.fingerprint
        if key not in self._adapters:
            try:
                self._adapters[key] = LirpaAdapter(network, self.options, method=self.method,
                                                   deadline=deadline)
            except (ModelError, BackendUnavailable) as exc:
                self._adapters[key] = str(exc)
        found = self._adapters[key]
        if isinstance(found, str):
            raise ModelError(found)
        return found

    def supports(self, network: Network, problem: Problem) -> str | None:
        """None when auto_LiRPA can bound this network on this problem, else why not."""
        why = super().supports(network, problem)
        if why:
            return why
        try:
            self.adapter(network, deadline_of(problem, self.options.timeout))
        except LipverifyError as exc:
            return str(exc)
        return None

    def _start(self, network: Network, problem: Problem
               ) -> tuple[float | None, LirpaAdapter | None, CentreFacts]:
        """The deadline, the adapter (None when building it ran out of time) and the centre
        facts: what `certify` needs before its first bound."""
        deadline = deadline_of(problem, self.options.timeout)
        try:
            adapter = self.adapter(network, deadline)
        except OutOfTime:
            adapter = None
        return deadline, adapter, CentreFacts.of(network, problem)

    def certify(self, network: Network, problem: Problem) -> list[Certificate]:
        """One certificate per input: bounds at eps, and the radius when asked for."""
        start = time.perf_counter()
        deadline, adapter, facts = self._start(network, problem)
        region, spec, slack, violated, centre = (facts.region, facts.spec, facts.slack,
                                                 facts.violated, facts.centre)
        eps = problem.perturbation.eps
        n = len(problem)
        if adapter is None or deadline_passed(deadline):
            outcomes = Outcomes(centre, slack, np.full(n, np.nan), np.zeros(n),
                                np.zeros(n, bool), True, confirmed=violated)
        elif problem.want_radius and not region.is_box:
            radius, margin = self.radii(adapter, region, spec, slack, centre > slack, eps,
                                        deadline)
            late = deadline_passed(deadline)
            outcomes = Outcomes(centre, slack, margin, radius, (radius >= eps) & (radius > 0),
                                late, confirmed=violated)
        else:
            margin = self.margins(adapter, region, spec, self.method, deadline) - slack
            late = deadline_passed(deadline)
            outcomes = Outcomes(centre, slack, margin, np.where(margin > 0, eps, 0.0),
                                margin > 0, late, confirmed=violated)
        seconds = (time.perf_counter() - start) / max(n, 1)
        return outcomes.certificates(self.name, region.centres, seconds,
                                     {"method": self.method.value})

    def radii(self, adapter: LirpaAdapter, region: Region, spec: Spec, slack: np.ndarray,
              searchable: np.ndarray, eps: float,
              deadline: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Certified radii of balls, and margin bounds at `eps` (NaN where not computed).

        alpha-CROWN starts from CROWN's radius (cheap, and alpha-CROWN's bound is at least as
        tight) and first probes just above it.
        """
        def search(method: Method, first: np.ndarray,
                   known: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            def margins_at(index: np.ndarray, radii: np.ndarray) -> np.ndarray:
                sub = region.subset(index).with_eps(radii)
                return self.margins(adapter, sub, spec.subset(index), method,
                                    deadline) - slack[index]

            growth = 1.0 if known is None else 4 * self.options.radius_rel_tol
            return bisect_radius(margins_at, first, self.options.radius_rel_tol, known, deadline,
                                 growth)

        first = np.where(searchable, first_radius(eps, len(spec)), 0.0)
        known = None
        at_eps = np.full(len(spec), np.nan)
        if self.method == Method.ALPHA_CROWN:
            known, crown_first = search(Method.CROWN, first, None)
            at_eps = crown_first if eps > 0 else at_eps
            first = np.where(known > 0, known * (1 + self.options.radius_rel_tol), first)
        radius, at_first = search(self.method, first, known)
        if eps > 0:  # both are sound bounds at eps where computed: keep the larger
            at_eps = np.where(first == eps, np.fmax(at_first, at_eps), at_eps)
        return radius, at_eps

    def margins(self, adapter: LirpaAdapter, region: Region, spec: Spec,
                method: Method, deadline: float | None = None) -> np.ndarray:
        """Lower bound on each input's property margin over its region (before the slack)."""
        lower = adapter.row_bounds(region, spec.c, method, deadline=deadline)
        return spec.combine(lower - spec.d)


class AlphaCrownBackend(LirpaBackend):
    """alpha-CROWN through auto_LiRPA: CROWN with optimised relaxation slopes.

    Xu et al., "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and
    Massively Parallel Incomplete Verifiers", ICLR 2021 (https://arxiv.org/abs/2011.13824), on
    auto_LiRPA (Xu et al., NeurIPS 2020).

    Proves the same kind of bound as `lirpa` (sound lower bounds on property margins over the
    ball or box), never looser than CROWN's at the start of the optimisation and usually
    tighter. Radius searches start from CROWN's certified radius. Cost: `alpha_iterations`
    forward-backward passes per bound, each in float32 for the slope search, then one float64
    CROWN pass with the slopes found (45 in the cascade: after l2prop, before LipSDP, whose
    class-pair SDPs cost far more on MLPs).

    Args:
        options: `LirpaOptions`; `alpha_iterations` and `alpha_lr` tune the optimisation.

    Example:
        >>> from lipverify.backends.lirpa import AlphaCrownBackend, Method
        >>> AlphaCrownBackend().method == Method.ALPHA_CROWN
        True
    """

    name: ClassVar[str] = "alpha-crown"
    cost: ClassVar[int] = 45
    default_method: ClassVar[Method] = Method.ALPHA_CROWN
