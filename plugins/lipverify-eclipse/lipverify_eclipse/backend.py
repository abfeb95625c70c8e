"""The `eclipse` and `eclipse-fast` lipverify backends."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from lipverify.backends.base import BackendBase, BackendOptions
from lipverify.errors import InputError, LipverifyError
from lipverify.margins import certificates_from_radii, margin_certificates, robust_radii
from lipverify.network.rounding import sound_outputs
from lipverify.network.layers import Activation
from lipverify.network.network import Network
from lipverify.sdp import Chain, chain_from_layers, unsupported_reason
from lipverify.types import Certificate, LipschitzBound, Norm, Problem, Scope, Status
from threadpoolctl import threadpool_limits

from lipverify_eclipse.lmi import CertificateError, ChainCertificate, Slopes, prove_chain, round_up
from lipverify_eclipse.multipliers import fast_multipliers, sdp_multipliers

log = logging.getLogger(__name__)

# ||d||_2 <= sqrt(n) ||d||_inf, with a relative push covering the rounding of sqrt and product.
LINF_ROUNDING = 1 + 1e-15


@dataclass(frozen=True)
class EclipseOptions(BackendOptions):
    """Options of the `eclipse` and `eclipse-fast` backends."""

    pairwise: bool = field(default=True, metadata={
        "help": "Bound each class-pair margin f_y - f_j separately (one small check per pair) "
                "instead of sqrt(2) times the global bound."})
    max_sdp_width: int = field(default=128, metadata={
        "help": "Layers wider than this use the closed form instead of eclipse-nn's stage SDP "
                "(SCS takes minutes on a 256-neuron stage)."})
    threads: int | None = field(default=1, metadata={
        "help": "BLAS threads while proving the bounds (None leaves the library default; "
                "one is fastest for these sizes, and much faster on a busy machine)."})


def _blas_threads(count: int | None) -> contextlib.AbstractContextManager:
    return threadpool_limits(count) if count else contextlib.nullcontext()


class EclipseBackend(BackendBase):
    """ECLipsE: compositional Lipschitz bounds from small per-layer matrix inequalities.

    Xu & Sivaranjani, "ECLipsE: Efficient Compositional Lipschitz Constant Estimation for Deep
    Neural Networks", NeurIPS 2024 (https://openreview.net/forum?id=61YYSy078Z), through the
    `eclipse-nn` package's stage SDP (SCS). ECLipsE splits LipSDP-Neuron's large matrix
    inequality into one small inequality per layer, solved in sequence.

    Proves a sound upper bound on the L2 Lipschitz constant of the network (global scope) and of
    each class-pair margin `f_y - f_j` (pairwise scope) for feed-forward networks with
    elementwise activations of slopes in `[0, b]` (ReLU, LeakyReLU, tanh, sigmoid; convolutions
    as their exact matrices). The solver's multipliers are not trusted: every layer's inequality
    is proven in float64 with a rounding margin (`lipverify_eclipse.lmi`), falling back to the
    closed form for a layer whose solve fails. L-inf uses `||d||_2 <= sqrt(n) ||d||_inf`.

    Cost: one SDP of size 2 x width per hidden layer (layers wider than `max_sdp_width` use
    the closed form), a dense eigenvalue check of size (fan-in + width) per layer, cached per
    network; then one forward pass per input.

    Args:
        options: `EclipseOptions` (pairwise, max_sdp_width, threads, seed, timeout).

    Example:
        >>> import torch
        >>> from lipverify.network.extract import extract_layers
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(),
        ...                           torch.nn.Linear(3, 2))
        >>> network = Network(net, (2,), 2, extract_layers(net, (2,)))
        >>> bound = EclipseFastBackend().lipschitz(network, Norm.L2)
        >>> bound.sound and bound.value > 0
        True
    """

    name: ClassVar[str] = "eclipse"
    cost: ClassVar[int] = 45
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2, Norm.LINF})
    scopes: ClassVar[frozenset[Scope]] = frozenset({Scope.GLOBAL, Scope.PAIRWISE})
    sound: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ("eclipse_nn", "cvxpy", "scs")
    Options: ClassVar[type] = EclipseOptions
    use_sdp: ClassVar[bool] = True

    def __init__(self, options: EclipseOptions | None = None) -> None:
        super().__init__(options)
        self._certs: dict[str, ChainCertificate | CertificateError] = {}
        self._rows: dict[tuple[str, bytes], float] = {}

    # -- what can run ------------------------------------------------------------------------
    def supports(self, network: Network, problem: Problem) -> str | None:
        """None when ECLipsE applies, else why not."""
        why = super().supports(network, problem)
        if why:
            return why
        return self.network_reason(network)

    def network_reason(self, network: Network) -> str | None:
        """None when the network is a chain ECLipsE handles, else why not."""
        if network.layers is None:
            return f"no layer view: {network.unsupported}"
        why = unsupported_reason(network.layers)
        if why:
            return why
        for layer in network.layers:
            if isinstance(layer, Activation) and layer.slopes[0] < 0:
                return f"{layer.kind} has negative slopes; ECLipsE needs slopes in [0, b]"
        return None

    # -- the proven chain ----------------------------------------------------------------------
    def _chain(self, network: Network) -> Chain:
        why = self.network_reason(network)
        if why:
            raise InputError(f"{self.name} cannot bound this network: {why}")
        return chain_from_layers(network.require_layers())

    def _choose(self, chain: Chain) -> Callable[[int, np.ndarray], Iterator]:
        slopes = [Slopes.of(lo, hi) for lo, hi in chain.slopes]

        def choose(i: int, y: np.ndarray) -> Iterator[tuple[np.ndarray, str]]:
            w, s = chain.weights[i], slopes[i]
            if self.use_sdp and w.shape[0] <= self.options.max_sdp_width:
                w_next = chain.weights[i + 1] if i + 1 < chain.depth else chain.last
                yield sdp_multipliers(y, w, s, w_next)
            yield fast_multipliers(y, w, s), "fast"

        return choose

    def certificate(self, network: Network) -> ChainCertificate:
        """The proven stages of `network` (cached per network).

        Raises:
            CertificateError: no multipliers gave a provable stage.
            InputError: the network is not a chain ECLipsE handles.
        """
        key = network.fingerprint
        if key not in self._certs:
            chain = self._chain(network)
            slopes = [Slopes.of(lo, hi) for lo, hi in chain.slopes]
            try:
                with _blas_threads(self.options.threads):
                    self._certs[key] = prove_chain(chain.weights, slopes, chain.last,
                                                   self._choose(chain))
            except CertificateError as exc:
                self._certs[key] = exc
        cert = self._certs[key]
        if isinstance(cert, CertificateError):
            raise cert
        return cert

    def row_bound(self, network: Network, row: np.ndarray) -> float:
        """A proven L2 bound of `x -> row . f(x)` (cached per network and row)."""
        row = np.asarray(row, np.float64).reshape(-1)
        key = (network.fingerprint, row.tobytes())
        if key not in self._rows:
            cert = self.certificate(network)
            if self.options.pairwise:
                with _blas_threads(self.options.threads):
                    self._rows[key] = cert.row_bound(row)
            else:
                self._rows[key] = round_up(round_up(float(np.linalg.norm(row))) * cert.bound())
        return self._rows[key]

    def pair_bounds(self, network: Network, labels: np.ndarray) -> np.ndarray:
        """`L[y, j]` for the rows `y` in `labels` (other rows NaN): bounds of `f_y - f_j`."""
        k = network.num_outputs
        out = np.full((k, k), np.nan)
        for y in np.unique(labels):
            for j in range(k):
                row = np.zeros(k)
                row[y] += 1.0
                row[j] -= 1.0
                out[y, j] = 0.0 if j == y else self.row_bound(network, row)
        return out

    def _details(self, cert: ChainCertificate) -> dict[str, Any]:
        return {"method": "ECLipsE" if self.use_sdp else "ECLipsE-Fast",
                "multipliers": [s.multipliers for s in cert.stages],
                "stage_deltas": [s.delta for s in cert.stages]}

    def lipschitz(self, network: Network, norm: Norm) -> LipschitzBound:
        """A proven global bound (L2 to L2; L-inf as sqrt(n) times it, which bounds inf-to-2)."""
        start = time.perf_counter()
        cert = self.certificate(network)
        value = self.row_bound_all(network)
        details = self._details(cert) | {"norm_note": "L2 -> L2"}
        if norm == Norm.LINF:
            value = round_up(value * math.sqrt(network.input_size) * LINF_ROUNDING)
            details["norm_note"] = "sqrt(n) x L2 bound: L-inf input to L2 (and L-inf) output"
        return LipschitzBound(value, norm, Scope.GLOBAL, self.name, time.perf_counter() - start,
                              True, details)

    def row_bound_all(self, network: Network) -> float:
        """The proven global L2 bound (all outputs), cached."""
        key = (network.fingerprint, b"global")
        if key not in self._rows:
            cert = self.certificate(network)
            with _blas_threads(self.options.threads):
                self._rows[key] = cert.bound()
        return self._rows[key]

    # -- certificates ------------------------------------------------------------------------
    def certify(self, network: Network, problem: Problem) -> list[Certificate]:
        """Certificates from centre margins and (pairwise) ECLipsE bounds."""
        start = time.perf_counter()
        pert = problem.perturbation
        factor = 1.0 if pert.norm == Norm.L2 else \
            math.sqrt(network.input_size) * LINF_ROUNDING
        try:
            details = self._details(self.certificate(network))
            outputs = sound_outputs(network, pert.centres(problem.inputs))
            labels = problem.labels
            if labels is not None:
                pairs = self.pair_bounds(network, labels) * factor
                pairs = np.where(pairs > 0, np.nextafter(pairs, np.inf), pairs)
                radii = robust_radii(outputs, labels, pairs)
                return certificates_from_radii(radii, pert.enclosing_radius(pert.norm),
                                               self.name, time.perf_counter() - start,
                                               [dict(details) for _ in radii])
            return margin_certificates(problem, outputs,
                                       lambda row: round_up(self.row_bound(network, row) * factor),
                                       self.name, time.perf_counter() - start)
        except LipverifyError as exc:  # an unprovable bound is an unknown answer, not a crash
            log.warning("%s: %s", self.name, exc)
            per = (time.perf_counter() - start) / max(len(problem), 1)
            return [Certificate(Status.UNKNOWN, self.name, seconds=per,
                                details={"reason": str(exc)}) for _ in range(len(problem))]


class EclipseFastBackend(EclipseBackend):
    """ECLipsE-Fast: ECLipsE with closed-form multipliers (no SDP), proven the same way.

    Xu & Sivaranjani, NeurIPS 2024 (https://openreview.net/forum?id=61YYSy078Z). Each layer's
    multiplier is `1 / (2 lambda_max(M W Y^-1 W' M))`; the layer inequalities are then proven
    in float64 like ECLipsE's (`lipverify_eclipse.lmi`). Same scope and soundness as `eclipse`.

    Cost: per hidden layer, one Cholesky solve and one dense eigenvalue check of size
    (fan-in + width), cached per network; then one forward pass per input.

    Args:
        options: `EclipseOptions` (pairwise, threads; max_sdp_width is not used).
    """

    name: ClassVar[str] = "eclipse-fast"
    cost: ClassVar[int] = 15
    requires: ClassVar[tuple[str, ...]] = ("scipy",)
    use_sdp: ClassVar[bool] = False
