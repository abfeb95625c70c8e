"""The small networks and problems the conformance kit runs a backend on.

Every network is built from a fixed seed (inside `torch.random.fork_rng`, so the caller's random
state is untouched) and covers one shape a backend may or may not handle: tiny 2-input ReLU nets
whose exact Lipschitz constant is enumerated, a linear net, MLPs, tanh, a convolutional net with
input normalisation, a residual net, GroupSort and a layer the layer view does not support.
Each network gets L2, L-infinity and box robustness problems and a general linear property.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lipverify.errors import UnsupportedLayerError
from lipverify.network.extract import extract_layers
from lipverify.network.modules import GroupSort, Normalize, ResidualBlock
from lipverify.network.network import Network
from lipverify.testing._attack import Regions, nearest_counterexamples, pgd
from lipverify.testing._exact import (
    affine_lipschitz,
    jacobian_lower_bound,
    linear_region_jacobians,
    operator_norm,
)
from lipverify.types import Norm, Perturbation, Problem, Property

# Inputs per problem: enough for batch checks, few enough to keep every backend fast.
INPUTS_PER_PROBLEM = 4


@dataclass(frozen=True)
class Case:
    """A test network and what is known about it.

    `exact` marks 2-input piecewise-linear nets (Linear + ReLU/LeakyReLU) whose exact Lipschitz
    constant the kit enumerates; `linear` marks affine nets (exact constant: a matrix norm).
    """

    name: str
    network: Network
    exact: bool = False
    linear: bool = False


@dataclass(frozen=True)
class ProblemCase:
    """A problem on a case's network, named for messages (`mlp/l2`)."""

    case: Case
    kind: str
    problem: Problem

    @property
    def name(self) -> str:
        """`network/kind`."""
        return f"{self.case.name}/{self.kind}"


def make_network(module: nn.Module, input_shape: tuple[int, ...], name: str) -> Network:
    """A `Network` of `module` (layer view extracted; None with the reason when unsupported)."""
    module = module.eval()
    try:
        layers = extract_layers(module, input_shape)
        unsupported = None
    except UnsupportedLayerError as exc:
        layers, unsupported = None, str(exc)
    with torch.no_grad():
        out = module(torch.zeros((1, *input_shape)))
    return Network(module, tuple(input_shape), int(out.numel()), layers, unsupported, name=name)


def _seeded(seed: int, build: Callable) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
        for p in module.parameters():  # spread the biases so regions are not all at the origin
            if p.dim() == 1:
                p.data.uniform_(-0.5, 0.5)
    return module


def _builders() -> dict[str, tuple[tuple[int, ...], Callable, dict]]:
    return {
        "relu2d": ((2,), lambda: nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8),
                                               nn.ReLU(), nn.Linear(8, 3)), {"exact": True}),
        "leaky2d": ((2,), lambda: nn.Sequential(nn.Linear(2, 6), nn.LeakyReLU(0.2),
                                                nn.Linear(6, 5), nn.LeakyReLU(0.2),
                                                nn.Linear(5, 2)), {"exact": True}),
        "linear": ((5,), lambda: nn.Sequential(nn.Linear(5, 3)), {"linear": True}),
        "mlp": ((10,), lambda: nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16),
                                             nn.ReLU(), nn.Linear(16, 4)), {}),
        "tanh": ((6,), lambda: nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)), {}),
        "conv": ((1, 6, 6), lambda: nn.Sequential(
            Normalize([0.5], [0.25]), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(36, 3)), {}),
        "residual": ((6,), lambda: nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(),
            ResidualBlock(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), nn.ReLU(),
            nn.Linear(8, 3)), {}),
        "groupsort": ((6,), lambda: nn.Sequential(nn.Linear(6, 8), GroupSort(2),
                                                  nn.Linear(8, 3)), {}),
        "maxpool": ((1, 4, 4), lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(8, 3)), {}),
    }


CASE_NAMES = tuple(_builders())


def build_cases(seed: int = 0, names: tuple[str, ...] | None = None) -> list[Case]:
    """The kit's networks (all of `CASE_NAMES` unless `names` picks some)."""
    cases = []
    for i, (name, (shape, build, flags)) in enumerate(_builders().items()):
        if names is not None and name not in names:
            continue
        module = _seeded(seed * 1000 + i, build)
        cases.append(Case(name, make_network(module, shape, name), **flags))
    return cases


def _linear_property(num_outputs: int, y: np.ndarray) -> Property:
    """`(y_0 - y_1 <= d and y_last <= d')`, set so the centre satisfies it by a margin."""
    c1 = np.zeros((2, num_outputs))
    c1[0, 0], c1[0, 1] = 1.0, -1.0
    c1[1, -1] = 1.0
    d1 = np.array([y[0] - y[1] - 0.3, y[-1] - 0.2])
    c2 = np.zeros((1, num_outputs))
    c2[0, 0] = -1.0
    d2 = np.array([-y[0] - 0.5])
    return Property.linear([(c1, d1), (c2, d2)], num_outputs)


def build_problems(case: Case, seed: int = 0) -> list[ProblemCase]:
    """L2, L-inf and box robustness (radius wanted) and a linear property, on the same inputs."""
    net = case.network
    rng = np.random.default_rng(seed + 17)
    x = rng.uniform(0.0, 1.0, size=(INPUTS_PER_PROBLEM, *net.input_shape)).astype(np.float32)
    y = net.forward(x)
    labels = np.argmax(y, axis=1)
    # A budget of the order of the inputs' own robustness, so some verify and some do not.
    scale = float(np.median(np.sort(y, axis=1)[:, -1] - np.sort(y, axis=1)[:, -2]))
    eps2 = max(0.05, min(0.5, scale)) / 4
    epsinf = eps2 / math.sqrt(net.input_size)
    half = rng.uniform(0.2, 1.0, size=x.shape) * epsinf
    k = net.num_outputs
    x64 = x.astype(np.float64)
    return [
        ProblemCase(case, "l2", Problem.robustness(x, labels, k, Perturbation.ball("2", eps2),
                                                   want_radius=True)),
        ProblemCase(case, "linf", Problem.robustness(x, labels, k,
                                                     Perturbation.ball("inf", epsinf),
                                                     want_radius=True)),
        ProblemCase(case, "box", Problem.robustness(x, labels, k,
                                                    Perturbation.box(x64 - half, x64 + half))),
        ProblemCase(case, "linear-l2", Problem(x, tuple(_linear_property(k, yi) for yi in y),
                                               Perturbation.ball("2", eps2))),
    ]


class ConformanceZoo:
    """The kit's networks and problems with their independent references, computed on demand.

    References (exact and sampled Lipschitz constants, attack results) do not depend on the
    backend under test, so one zoo can serve many `check_backend` calls: each reference is
    computed the first time it is asked for and kept in this object (never in a global).

    Args:
        seed: Seed of the networks, inputs and attacks.
        cases: Names from `CASE_NAMES` to use (default: all).
    """

    def __init__(self, seed: int = 0, cases: tuple[str, ...] | None = None) -> None:
        self.seed = seed
        self.cases = build_cases(seed, cases)
        self.problems = [p for c in self.cases for p in build_problems(c, seed)]
        self._memo: dict[tuple, object] = {}

    def _cached(self, key: tuple, compute: Callable) -> object:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def exact_lipschitz(self, case: Case, norm: Norm) -> float | None:
        """The exact Lipschitz constant of an `exact` or `linear` case (None for others)."""
        module = case.network.module
        if case.linear:
            return self._cached(("affine", case.name, norm), lambda: affine_lipschitz(module, norm))
        if not case.exact:
            return None
        jacs = self._cached(("regions", case.name), lambda: linear_region_jacobians(module))
        return max(operator_norm(j, norm) for j in jacs)

    def sampled_lipschitz(self, case: Case, norm: Norm) -> float:
        """The largest sampled Jacobian norm or difference quotient: a lower bound."""
        net = case.network
        return self._cached(("sampled", case.name, norm), lambda: jacobian_lower_bound(
            net.module, net.input_shape, norm, seed=self.seed))

    def attack(self, pcase: ProblemCase) -> list[np.ndarray | None]:
        """Per input, a counterexample inside its region of the problem, or None."""
        prob = pcase.problem
        return self._cached(("attack", pcase.name), lambda: pgd(
            pcase.case.network, prob.properties, Regions.of(prob.perturbation, prob.inputs),
            self.seed))

    def nearest_counterexamples(self, pcase: ProblemCase) -> list[tuple[float, np.ndarray] | None]:
        """Per input, (distance, point) of a counterexample near its centre, or None."""
        prob = pcase.problem
        regions = Regions.of(prob.perturbation, prob.inputs)

        def compute() -> list[tuple[float, np.ndarray] | None]:
            points = nearest_counterexamples(pcase.case.network, prob.properties, regions,
                                             self.seed)
            return [None if p is None else (float(regions.subset([i]).distance(p[None])[0]), p)
                    for i, p in enumerate(points)]

        return self._cached(("nearest", pcase.name), compute)
