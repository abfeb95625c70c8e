"""The Python API, mirroring the command line: `certify`, `lipschitz` (and `compare`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lipverify.backends.base import Verifier
from lipverify.backends.registry import BackendRegistry
from lipverify.errors import InputError, LipverifyError
from lipverify.network.network import Network
from lipverify.orchestrator import Mode, Outcome, run_cascade
from lipverify.types import Certificate, LipschitzBound, Norm, Perturbation, Problem

if TYPE_CHECKING:
    from lipverify.lower_lipschitz import LowerLipschitzBound
    from lipverify.lower_lipschitz_search import LowerLipschitzCounterexample
    from lipverify.parameter_lipschitz import ParameterLipschitzBound
    from lipverify.parameter_lipschitz_search import ParameterLipschitzEstimate

DEFAULT_BACKENDS = ("attack", "spectral", "lirpa", "local", "lipsdp")


@dataclass(frozen=True)
class CertifyResult:
    """Certificates per eps: the best per input, and what each backend proved."""

    eps: tuple[float, ...]
    best: Mapping[float, tuple[Certificate, ...]]
    per_backend: Mapping[float, Mapping[str, tuple[Certificate | None, ...]]]
    clean_accuracy: float
    skipped: Mapping[str, str] = field(default_factory=dict)

    def certified(self, eps: float, backend: str = "best") -> int:
        """How many inputs are verified at `eps` by `backend` (or the best of all)."""
        certs = self.best[eps] if backend == "best" else self.per_backend[eps].get(backend, ())
        return sum(1 for c in certs if c is not None and c.status.value == "verified")


def as_network(model: Network | torch.nn.Module | str | Path,
               input_shape: Sequence[int] | None = None) -> Network:
    """A `Network` from a module, a file path or a shipped model name."""
    if isinstance(model, Network):
        return model
    from lipverify.models import ARCHITECTURES, INPUT_SHAPE, load_shipped
    from lipverify.network.load import load_network

    if isinstance(model, str) and model in ARCHITECTURES:
        return load_network(load_shipped(model), INPUT_SHAPE, name=model)
    shape = tuple(input_shape) if input_shape is not None else None
    return load_network(model, shape)


def make_backends(backends: Sequence[str | Verifier],
                  options: Mapping[str, Any] | None = None) -> list[Verifier]:
    """Backend instances from names (through the registry) or ready instances."""
    registry = BackendRegistry.from_entry_points()
    out = []
    for b in backends:
        if isinstance(b, str):
            out.append(registry.create(b, (options or {}).get(b)))
        else:
            out.append(b)
    return sorted(out, key=lambda b: b.cost)


def certify(model: Network | torch.nn.Module | str | Path, inputs: np.ndarray,
            labels: Sequence[int], eps: float | Sequence[float], *, norm: str | Norm = "2",
            backends: Sequence[str | Verifier] = DEFAULT_BACKENDS, mode: str = "budget",
            input_shape: Sequence[int] | None = None) -> CertifyResult:
    """Certify robustness of each input's label at each eps.

    Example:
        >>> from lipverify.data import load_data
        >>> x, y = load_data("digits", limit=8)
        >>> result = certify("digits_mlp", x, y, 0.1, backends=["spectral"])
        >>> result.certified(0.1) <= 8
        True
    """
    network = as_network(model, input_shape)
    inputs = np.asarray(inputs, dtype=np.float32)
    labels = np.asarray(labels)
    eps_values = (float(eps),) if np.isscalar(eps) else tuple(float(e) for e in eps)
    if not eps_values:
        raise InputError("give at least one eps")
    instances = make_backends(backends)
    best: dict[float, tuple[Certificate, ...]] = {}
    per: dict[float, dict[str, tuple[Certificate | None, ...]]] = {}
    skipped: dict[str, str] = {}
    for e in eps_values:
        problem = Problem.robustness(inputs, labels, network.num_outputs,
                                     Perturbation.ball(norm, e), want_radius=mode == "radius")
        outcome: Outcome = run_cascade(network, problem, instances, Mode(mode))
        best[e] = outcome.best
        per[e] = outcome.per_backend
        skipped.update(outcome.skipped)
    predicted = network.forward(inputs).argmax(1) if len(inputs) else np.array([])
    accuracy = float(np.mean(predicted == labels)) if len(inputs) else 0.0
    return CertifyResult(eps_values, best, per, accuracy, skipped)


@dataclass(frozen=True)
class LipschitzReport:
    """Upper bounds per backend next to an empirical lower bound."""

    bounds: tuple[LipschitzBound, ...]
    lower_bound: float
    lower_method: str
    skipped: Mapping[str, str] = field(default_factory=dict)

    def ratio(self, bound: LipschitzBound) -> float:
        """How far an upper bound is above the lower bound (>= 1 when both are right)."""
        return bound.value / self.lower_bound if self.lower_bound > 0 else float("inf")


def lipschitz(model: Network | torch.nn.Module | str | Path,
              backends: Sequence[str | Verifier] = ("spectral",), *, norm: str | Norm = "2",
              data: np.ndarray | None = None, seed: int = 0,
              input_shape: Sequence[int] | None = None) -> LipschitzReport:
    """Global Lipschitz upper bounds per backend and an empirical lower bound.

    A backend that cannot bound this network (e.g. lipsdp on a residual net) is reported in
    `skipped` with its reason and the others' bounds are kept; if every backend fails, the
    first failure is raised.
    """
    from lipverify.lower_bounds import jacobian_lower_bound

    network = as_network(model, input_shape)
    norm = Norm.parse(norm)
    bounds, skipped, failures = [], {}, []
    for backend in make_backends(backends):
        if not hasattr(backend, "lipschitz"):
            raise InputError(f"backend {backend.name!r} does not bound Lipschitz constants")
        try:
            bounds.append(backend.lipschitz(network, norm))
        except LipverifyError as exc:
            skipped[backend.name] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            failures.append(exc)
    if not bounds and failures:
        raise failures[0]
    lower = jacobian_lower_bound(network, data, norm=norm, seed=seed)
    return LipschitzReport(tuple(bounds), float(lower.value), str(lower.method), skipped)


def compare(model: Network | torch.nn.Module | str | Path, inputs: np.ndarray,
            labels: Sequence[int], eps: Sequence[float], *,
            backends: Sequence[str | Verifier] = ("spectral", "lirpa", "lipsdp"),
            norm: str | Norm = "2", out: str | Path | None = None, seed: int = 0,
            input_shape: Sequence[int] | None = None) -> Any:
    """Every backend on the same inputs: bounds, radii and lower bounds (a `Comparison`).

    With `out`, also writes summary.md, radii.csv and the PNG plots there.
    """
    from lipverify.comparison.collect import collect
    from lipverify.comparison.report import write_report

    network = as_network(model, input_shape)
    result = collect(network, np.asarray(inputs, dtype=np.float32), np.asarray(labels),
                     make_backends(backends), Norm.parse(norm), list(eps), seed)
    if out is not None:
        write_report(result, Path(out))
    return result


@dataclass(frozen=True)
class LowerLipschitzReport:
    """A certified lower Lipschitz constant (L2) and the best counterexample pair found.

    `bound.value <= counterexample.ratio` always: the first is proven from below, the second
    is an upper bound on the true constant.
    """

    bound: LowerLipschitzBound
    counterexample: LowerLipschitzCounterexample

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"certified": self.bound.to_json(), "search": self.counterexample.to_json()}


def lower_lipschitz(model: Network | torch.nn.Module | str | Path, *, claim: float | None = None,
                    data: np.ndarray | None = None, seed: int = 0,
                    input_shape: Sequence[int] | None = None) -> LowerLipschitzReport:
    """Certified `c` with `||f(x) - f(x')||_2 >= c ||x - x'||_2`, and a pair refuting `claim`.

    See `lipverify.lower_lipschitz` (the bound) and `lipverify.lower_lipschitz_search`.
    """
    from lipverify.lower_lipschitz import lower_lipschitz_bound
    from lipverify.lower_lipschitz_search import search_lower_counterexample

    network = as_network(model, input_shape)
    bound = lower_lipschitz_bound(network)
    found = search_lower_counterexample(network, claim, data, seed=seed)
    return LowerLipschitzReport(bound, found)


@dataclass(frozen=True)
class ParameterLipschitzReport:
    """A sound bound of the Lipschitz constant in the parameters beside a sampled lower bound."""

    bound: ParameterLipschitzBound
    sampled: ParameterLipschitzEstimate

    @property
    def ratio(self) -> float:
        """How far the bound is above the sampled lower bound."""
        return self.bound.value / self.sampled.value if self.sampled.value > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"bound": self.bound.to_json(), "sampled": self.sampled.to_json(),
                "ratio": self.ratio}


def parameter_lipschitz(model: Network | torch.nn.Module | str | Path, input_radius: float,
                        param_radius: float, *, seed: int = 0,
                        input_shape: Sequence[int] | None = None) -> ParameterLipschitzReport:
    """Bound `||f(x; t) - f(x; t')|| / ||t - t'||` over `||x|| <= input_radius` and parameters
    within `param_radius` of the network's own (dense feed-forward networks), with a sampled
    lower bound. See `lipverify.parameter_lipschitz`.
    """
    from lipverify.parameter_lipschitz import parameter_lipschitz_bound
    from lipverify.parameter_lipschitz_search import parameter_lipschitz_lower

    network = as_network(model, input_shape)
    return ParameterLipschitzReport(
        parameter_lipschitz_bound(network, input_radius, param_radius),
        parameter_lipschitz_lower(network, input_radius, param_radius, seed=seed))
