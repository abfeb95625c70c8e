"""The `spectral` backend: global and pairwise Lipschitz certificates from per-layer norm bounds."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from lipverify.backends.base import BackendBase, BackendOptions
from lipverify.margins import (
    certificates_from_radii,
    property_radius,
    robust_radii,
)
from lipverify.network.network import Network
from lipverify.network.rounding import SoundOutputs, sound_outputs
from lipverify.norms.conv import EXPLICIT_MAX_ENTRIES, TWIST_CANDIDATES
from lipverify.norms.dense import up
from lipverify.norms.network import (
    BoundOptions,
    NetworkBounds,
    layer_norm_bound,
    network_bounds,
    prefix_bounds,
)
from lipverify.types import Certificate, LipschitzBound, Norm, Problem, Scope, Status

__all__ = ["SpectralBackend", "SpectralOptions", "layer_norm_bound", "prefix_bounds"]


@dataclass(frozen=True)
class SpectralOptions(BackendOptions):
    """Options of the `spectral` backend."""

    twist_candidates: int = field(default=TWIST_CANDIDATES, metadata={
        "help": "Twists per axis scanned for the circulant embedding of zero-padded convolutions "
                "(1: plain circulant)."})
    explicit_max_entries: int = field(default=EXPLICIT_MAX_ENTRIES, metadata={
        "help": "Convolutions whose exact matrix has at most this many entries also get an "
                "exact SVD of it."})
    threads: int | None = field(default=1, metadata={
        "help": "Torch and BLAS threads while computing bounds and forward passes (None leaves "
                "the library default)."})

    def bound_options(self) -> BoundOptions:
        """The per-layer bound options these backend options imply."""
        return BoundOptions(int(self.twist_candidates), int(self.explicit_max_entries))


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Cap torch and BLAS threads for the duration (restored afterwards).

    One thread is the default because spinning OpenMP/BLAS threads collapse when cores are shared.
    """
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(count))
    try:
        if importlib.util.find_spec("threadpoolctl") is not None:
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=int(count), user_api="blas"):
                yield
        else:
            yield
    finally:
        torch.set_num_threads(before)


def _body_details(bounds: NetworkBounds) -> dict[str, float]:
    """The body constants a certificate rests on (L2: 2->2; L-infinity: inf->inf and inf->2)."""
    if bounds.norm == Norm.L2:
        return {"L_body": bounds.body_l2}
    return {"L_body": bounds.body_linf, "L_body_inf_to_l2": bounds.body_inf_to_l2}


class SpectralBackend(BackendBase):
    """Sound Lipschitz certificates from products of per-layer operator-norm bounds.

    The network's Lipschitz constant is bounded by the product of its layers' constants, each a
    provable upper bound with floating-point error accounted for: dense layers by the float64
    SVD with a backward-error slack, checked against Gram iteration; convolutions (zero padding,
    stride, dilation, groups honoured) by Gram iteration on a twisted circulant embedding of the
    exact operator (Delattre, Barthélemy, Araujo, Allauzen, "Efficient Bound of Lipschitz
    Constant for Convolutional Layers by Gram Iteration", ICML 2023,
    https://arxiv.org/abs/2305.16173), by the four reshaped-kernel bounds of Singla & Feizi
    ("Fantastic Four", ICLR 2021, https://arxiv.org/abs/1911.10258) and, for small layers, by the
    SVD of the exact matrix; residual blocks by `1 + L(body)`; activations by their slopes.
    Robustness uses pairwise constants `L_yj = L(body) ||W_y - W_j||` of the last dense layer
    (Tsuzuku, Sato, Sugiyama, "Lipschitz-Margin Training", NeurIPS 2018), never looser than
    `margin / (sqrt(2) L)`.

    What it proves: L2 and L-infinity (and box, through the enclosing L-infinity ball) robustness
    and general linear properties, globally (scope global and pairwise); sound. L-infinity
    constants are the smallest of norm equivalence, inf->inf products and mixed inf->2 chains.

    Cost: the bound is computed once per network (cached in the instance by
    `network.fingerprint`); after that one float32 forward pass per input (tens of thousands of
    inputs per second on a small MLP).

    Args:
        options: `SpectralOptions` (twist scan size, explicit-matrix size limit, threads).

    Example:
        >>> from lipverify.backends.spectral import SpectralBackend
        >>> from lipverify.models import INPUT_SHAPE, load_shipped
        >>> from lipverify.network.load import build_network
        >>> from lipverify.types import Norm
        >>> net = build_network(load_shipped("digits_mlp"), INPUT_SHAPE)
        >>> bound = SpectralBackend().lipschitz(net, Norm.L2)
        >>> bound.sound, bound.value > 0
        (True, True)

    """

    name: ClassVar[str] = "spectral"
    cost: ClassVar[int] = 10
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2, Norm.LINF})
    scopes: ClassVar[frozenset[Scope]] = frozenset({Scope.GLOBAL, Scope.PAIRWISE})
    sound: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = SpectralOptions

    def __init__(self, options: SpectralOptions | None = None) -> None:
        super().__init__(options)
        self._cache: dict[tuple[str, Norm], tuple[NetworkBounds, float]] = {}
        self._pair_cache: dict[tuple[str, Norm], np.ndarray] = {}

    # ----------------------------------------------------------------------------- capabilities
    def supports(self, network: Network, problem: Problem) -> str | None:
        """None when the network has a layer view and the norm is L2 or L-infinity, else why not."""
        why = super().supports(network, problem)
        if why:
            return why
        if network.layers is None:
            return f"no layer view of the network ({network.unsupported or 'unsupported layer'})"
        wrong = {p.num_outputs for p in problem.properties} - {network.num_outputs}
        if wrong:
            return (f"properties are over {sorted(wrong)} outputs but the network has "
                    f"{network.num_outputs}")
        return None

    # ----------------------------------------------------------------------------------- bounds
    def bounds(self, network: Network, norm: Norm) -> tuple[NetworkBounds, float]:
        """The network's body/head bounds for inputs perturbed in `norm`, and the seconds spent.

        Cached per `network.fingerprint` and norm; the per-layer bounds are shared by both norms.
        """
        norm = Norm.parse(norm)
        key = (network.fingerprint, norm)
        if key not in self._cache:
            start = time.perf_counter()
            other = self._cache.get((key[0], Norm.LINF if norm == Norm.L2 else Norm.L2))
            layers = network.require_layers()
            with _threads(self.options.threads):
                result = network_bounds(layers, network.input_size, network.num_outputs, norm,
                                        self.options.bound_options(),
                                        other[0].layers if other is not None else None)
            self._cache[key] = (result, time.perf_counter() - start)
        return self._cache[key]

    def lipschitz(self, network: Network, norm: Norm) -> LipschitzBound:
        """A sound bound of the whole network's Lipschitz constant in `norm` -> `norm`."""
        start = time.perf_counter()
        b, seconds = self.bounds(network, norm)
        details: dict[str, Any] = {
            "layers": [lb.to_json() for lb in b.layers],
            "factors": [lb.value(b.norm) for lb in b.layers],
            "methods": [lb.method for lb in b.layers],
            "body_l2": b.body_l2,
            "body_linf": b.body_linf,
            "body_inf_to_l2": b.body_inf_to_l2,
            "bound_seconds": seconds,
        }
        return LipschitzBound(b.global_value, b.norm, Scope.GLOBAL, self.name,
                              time.perf_counter() - start + seconds, True, details)

    def pairwise_lipschitz(self, network: Network, norm: Norm) -> np.ndarray:
        """`(K, K)` sound bounds of the Lipschitz constants of `f_y - f_j` (cached)."""
        return self._pairwise(network, Norm.parse(norm)).copy()

    def _pairwise(self, network: Network, norm: Norm) -> np.ndarray:
        key = (network.fingerprint, norm)
        if key not in self._pair_cache:
            self._pair_cache[key] = self.bounds(network, norm)[0].pairwise()
        return self._pair_cache[key]

    # -------------------------------------------------------------------------------- certify
    def certify(self, network: Network, problem: Problem) -> list[Certificate]:
        """One certificate per input: radius always filled, status at the problem's budget."""
        start = time.perf_counter()
        if problem.expired():
            return [Certificate(Status.TIMEOUT, self.name) for _ in range(len(problem))]
        with _threads(self.options.threads):
            return self._certify(network, problem, start)

    def _certify(self, network: Network, problem: Problem, start: float) -> list[Certificate]:
        pert = problem.perturbation
        norm = pert.norm
        bounds, _ = self.bounds(network, norm)
        inputs = np.asarray(problem.inputs, dtype=np.float64)
        centres = np.asarray(pert.centres(inputs), dtype=np.float64)
        # Outputs at the exact centres, in float64 with a proven bound on their rounding error.
        outputs = sound_outputs(network, centres)
        if pert.is_box:
            lower = pert.lower.reshape(len(inputs), -1)
            upper = pert.upper.reshape(len(inputs), -1)
            flat = centres.reshape(len(inputs), -1)
            budget = up(np.maximum(np.max(upper - flat, axis=1), np.max(flat - lower, axis=1)))
        else:
            budget = np.full(len(inputs), pert.eps)
        labels = problem.labels
        if labels is not None and len(inputs):
            radii, details = self._robust(network, bounds, outputs, labels, norm)
        else:
            radii, details = self._general(bounds, problem, outputs)
        return self._certificates(radii, budget, details, time.perf_counter() - start)

    def _robust(self, network: Network, bounds: NetworkBounds, outputs: SoundOutputs,
                labels: np.ndarray, norm: Norm) -> tuple[np.ndarray, list[dict[str, Any]]]:
        pair = self._pairwise(network, norm)
        radii = robust_radii(outputs, labels, pair)
        rows = np.arange(len(labels))
        gaps = outputs.values[rows, labels][:, None] - outputs.values
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(pair[labels] > 0, gaps / pair[labels], np.inf)
        ratio[rows, labels] = np.inf
        binding = np.argmin(ratio, axis=1)
        body = _body_details(bounds)
        lips = pair[labels, binding]
        margins = gaps[rows, binding]
        details = [{**body, "binding_class": int(j), "pair_lipschitz": float(lip),
                    "centre_margin": float(m)}
                   for j, lip, m in zip(binding.tolist(), lips.tolist(), margins.tolist(),
                                        strict=True)]
        return radii, details

    def _general(self, bounds: NetworkBounds, problem: Problem,
                 outputs: SoundOutputs) -> tuple[np.ndarray, list[dict[str, Any]]]:
        cache: dict[bytes, float] = {}

        def row_lipschitz(row: np.ndarray) -> float:
            key = np.asarray(row, dtype=np.float64).tobytes()
            if key not in cache:
                cache[key] = bounds.row_lipschitz(row)
            return cache[key]

        radii, details = [], []
        body = _body_details(bounds)
        for prop, y, e in zip(problem.properties, outputs.values, outputs.error, strict=True):
            r, worst = property_radius(prop, y, row_lipschitz, e)
            radii.append(r)
            details.append({**body, "centre_margin": worst})
        return np.asarray(radii, dtype=np.float64), details

    def _certificates(self, radii: np.ndarray, budget: np.ndarray, details: list[dict[str, Any]],
                      seconds: float) -> list[Certificate]:
        """Statuses against each input's own budget, through `certificates_from_radii`."""
        out: list[Certificate | None] = [None] * len(radii)
        per = seconds / max(len(radii), 1)
        for eps in np.unique(budget):
            index = np.flatnonzero(budget == eps)
            certs = certificates_from_radii(radii[index].tolist(), float(eps), self.name,
                                            per * len(index), [details[i] for i in index])
            for i, cert in zip(index.tolist(), certs, strict=True):
                out[i] = cert
        return [c for c in out if c is not None]
