"""Core value types: norms, perturbations, properties, problems, bounds and certificates.

Everything a backend returns is a frozen dataclass holding floats and NumPy arrays (never live
tensors), so results can be written to JSONL, compared and cached without touching torch.
"""

from __future__ import annotations

import enum
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lipverify.errors import InputError


class Norm(enum.Enum):
    """The norm of a perturbation ball (and of the Lipschitz constant that certifies it)."""

    L2 = "2"
    LINF = "inf"

    @classmethod
    def parse(cls, text: str | float | Norm) -> Norm:
        """Read `2`, `l2`, `inf`, `linf` (any case) into a `Norm`."""
        if isinstance(text, Norm):
            return text
        key = str(text).strip().lower().removeprefix("l")
        if key in ("2", "2.0"):
            return cls.L2
        if key in ("inf", "infinity", "oo"):
            return cls.LINF
        raise InputError(f"unknown norm {text!r}: use 2 or inf")


class Status(enum.Enum):
    """Outcome of certifying one input."""

    VERIFIED = "verified"
    FALSIFIED = "falsified"
    UNKNOWN = "unknown"
    TIMEOUT = "timeout"
    ERROR = "error"

    @property
    def resolved(self) -> bool:
        """True when the answer is final (verified or falsified)."""
        return self in (Status.VERIFIED, Status.FALSIFIED)


class Scope(enum.Enum):
    """What a Lipschitz bound is a bound of."""

    GLOBAL = "global"
    PAIRWISE = "pairwise"
    LOCAL = "local"


@dataclass(frozen=True)
class Perturbation:
    """An L2 or L-infinity ball of radius `eps` around each input, or a box `[lower, upper]`.

    For a box, `lower` and `upper` have the shape of the whole input batch; `norm` is LINF and
    `eps` the largest half-width (what a Lipschitz backend may use as an enclosing ball).
    """

    norm: Norm
    eps: float
    lower: np.ndarray | None = field(default=None, compare=False, repr=False)
    upper: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.eps, (int, float)) or math.isnan(self.eps) or self.eps < 0:
            raise InputError(f"eps must be a non-negative number, got {self.eps!r}")
        if math.isinf(self.eps):
            raise InputError("eps must be finite")

    @classmethod
    def ball(cls, norm: Norm | str | float, eps: float) -> Perturbation:
        """An L2 or L-infinity ball of radius `eps`."""
        return cls(Norm.parse(norm), float(eps))

    @classmethod
    def box(cls, lower: np.ndarray, upper: np.ndarray) -> Perturbation:
        """A box `[lower, upper]` (batch-shaped arrays)."""
        lower = np.asarray(lower, dtype=np.float64)
        upper = np.asarray(upper, dtype=np.float64)
        if lower.shape != upper.shape:
            raise InputError(f"box bounds differ in shape: {lower.shape} vs {upper.shape}")
        if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
            raise InputError("box bounds must be finite")
        if np.any(lower > upper):
            raise InputError("box has lower > upper")
        eps = float(np.max(upper - lower) / 2) if lower.size else 0.0
        return cls(Norm.LINF, eps, lower, upper)

    @property
    def is_box(self) -> bool:
        """True for a box perturbation."""
        return self.lower is not None

    def with_eps(self, eps: float) -> Perturbation:
        """The same ball with another radius (boxes cannot be rescaled)."""
        if self.is_box:
            raise InputError("a box perturbation has no single radius to change")
        return Perturbation(self.norm, float(eps))

    def centres(self, inputs: np.ndarray) -> np.ndarray:
        """Centre of each input's region (the input itself for balls)."""
        if self.is_box:
            return (self.lower + self.upper) / 2
        return inputs

    def enclosing_radius(self, norm: Norm) -> float:
        """Radius of a `norm` ball around `centres` that contains the whole region."""
        if not self.is_box:
            if norm == self.norm:
                return self.eps
            if norm == Norm.LINF:  # an L2 ball is inside the L-inf ball of the same radius
                return self.eps
            raise InputError("an L2 enclosing radius of an L-inf ball needs the dimension")
        half = (self.upper - self.lower) / 2
        if norm == Norm.LINF:
            return float(np.max(half))
        return float(np.max(np.sqrt(np.sum(half.reshape(half.shape[0], -1) ** 2, axis=1))))


@dataclass(frozen=True)
class Property:
    """What must hold on the outputs, written as what must never happen.

    The property is violated at output `y` when any term holds, a term being the conjunction
    `C y <= d` (rows of `C`). Robustness of label `t` has one term per other class `j`:
    `(e_t - e_j) y <= 0`, i.e. class `j` scores at least as high as `t`.
    """

    terms: tuple[tuple[np.ndarray, np.ndarray], ...]
    num_outputs: int
    label: int | None = None

    @classmethod
    def robust(cls, label: int, num_outputs: int) -> Property:
        """Robustness of `label` among `num_outputs` classes."""
        label = int(label)
        if not 0 <= label < num_outputs:
            raise InputError(f"label {label} out of range for {num_outputs} outputs")
        terms = []
        for j in range(num_outputs):
            if j != label:
                c = np.zeros((1, num_outputs))
                c[0, label], c[0, j] = 1.0, -1.0
                terms.append((c, np.zeros(1)))
        return cls(tuple(terms), num_outputs, label)

    @classmethod
    def linear(cls, terms: Sequence[tuple[np.ndarray, np.ndarray]], num_outputs: int) -> Property:
        """A disjunction of conjunctions `C y <= d`."""
        checked = []
        for c, d in terms:
            c = np.atleast_2d(np.asarray(c, dtype=np.float64))
            d = np.atleast_1d(np.asarray(d, dtype=np.float64))
            if c.shape[1] != num_outputs or d.shape != (c.shape[0],):
                raise InputError(f"property term of shape {c.shape}/{d.shape} does not fit "
                                 f"{num_outputs} outputs")
            checked.append((c, d))
        return cls(tuple(checked), num_outputs)

    def row_margins(self, y: np.ndarray) -> list[np.ndarray]:
        """Per term, the slack `C y - d` of each row at outputs `y` (shape (K,))."""
        return [c @ y - d for c, d in self.terms]

    def margin(self, y: np.ndarray) -> float:
        """Signed margin: positive when no term holds at `y`, non-positive when one does."""
        if not self.terms:
            return math.inf
        return float(min(np.max(s) for s in self.row_margins(np.asarray(y, np.float64))))

    def violated(self, y: np.ndarray) -> bool:
        """True when some term holds at output `y`."""
        return self.margin(y) <= 0


@dataclass(frozen=True)
class Problem:
    """A batch of inputs, one property each, and one perturbation for all.

    `want_radius` asks backends for the largest radius they can certify, not only the status at
    `perturbation.eps`. `deadline` is a `time.monotonic()` instant after which backends should
    stop and answer `timeout`/`unknown` for what they have not resolved (cooperative).
    """

    inputs: np.ndarray
    properties: tuple[Property, ...]
    perturbation: Perturbation
    want_radius: bool = False
    deadline: float | None = None

    def time_left(self) -> float:
        """Seconds until the deadline (infinite without one)."""
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.time_left() <= 0

    def __post_init__(self) -> None:
        if len(self.properties) != len(self.inputs):
            raise InputError(f"{len(self.inputs)} inputs but {len(self.properties)} properties")
        if not np.issubdtype(np.asarray(self.inputs).dtype, np.floating):
            raise InputError(f"inputs must be floating point, got {np.asarray(self.inputs).dtype}")
        if not np.all(np.isfinite(self.inputs)):
            raise InputError("inputs contain NaN or infinite values")

    @classmethod
    def robustness(cls, inputs: np.ndarray, labels: Sequence[int], num_outputs: int,
                   perturbation: Perturbation, want_radius: bool = False) -> Problem:
        """Robustness of each input's label inside `perturbation`."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) != len(inputs):
            raise InputError(f"need one label per input: {len(inputs)} inputs, labels shape "
                             f"{labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"labels must be integers, got {labels.dtype}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_outputs):
            raise InputError(f"labels must lie in [0, {num_outputs - 1}], got "
                             f"{labels.min()}..{labels.max()}")
        # One shared (immutable) Property per class keeps large batches cheap.
        by_label = {int(t): Property.robust(int(t), num_outputs) for t in np.unique(labels)}
        props = tuple(by_label[int(t)] for t in labels)
        return cls(np.asarray(inputs), props, perturbation, want_radius)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def labels(self) -> np.ndarray | None:
        """Labels when every property is robustness of a label, else None."""
        if any(p.label is None for p in self.properties):
            return None
        return np.array([p.label for p in self.properties], dtype=np.int64)

    def subset(self, index: Sequence[int]) -> Problem:
        """The problem restricted to `index` (the box restricted too)."""
        index = np.asarray(index, dtype=np.int64)
        pert = self.perturbation
        if pert.is_box:
            pert = Perturbation(pert.norm, pert.eps, pert.lower[index], pert.upper[index])
        return Problem(self.inputs[index], tuple(self.properties[i] for i in index), pert,
                       self.want_radius, self.deadline)

    def with_deadline(self, deadline: float | None) -> Problem:
        """The same problem with another deadline."""
        return Problem(self.inputs, self.properties, self.perturbation, self.want_radius,
                       deadline)


def deadline_passed(deadline: float | None) -> bool:
    """True once `deadline` (a `time.monotonic()` instant; None: never) has passed."""
    return deadline is not None and time.monotonic() > deadline


def _clean(value: Any) -> Any:
    """Make a value JSON-friendly (NumPy to Python, inf/nan to strings)."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _float(value: Any) -> float:
    return float(value) if value is not None else math.nan


@dataclass(frozen=True, slots=True)
class LipschitzBound:
    """A Lipschitz constant bound (or an estimate, when `sound` is False)."""

    value: float
    norm: Norm
    scope: Scope
    backend: str
    seconds: float
    sound: bool
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return _clean({"value": self.value, "norm": self.norm, "scope": self.scope,
                       "backend": self.backend, "seconds": self.seconds, "sound": self.sound,
                       "details": dict(self.details)})


@dataclass(frozen=True, slots=True)
class Certificate:
    """The answer for one input.

    `radius` is the largest perturbation radius proven safe (0 if none), `margin_lower` a lower
    bound on the worst property margin over the budget (NaN when the backend has none), and
    `counterexample` an input that a forward pass confirmed violates the property.
    """

    status: Status
    backend: str
    radius: float = 0.0
    margin_lower: float = math.nan
    seconds: float = 0.0
    counterexample: tuple[float, ...] | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return _clean({"status": self.status, "backend": self.backend, "radius": self.radius,
                       "margin_lower": self.margin_lower, "seconds": self.seconds,
                       "counterexample": self.counterexample, "details": dict(self.details)})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Certificate:
        """Inverse of `to_json`."""
        cex = data.get("counterexample")
        return cls(Status(data["status"]), data["backend"], _float(data.get("radius", 0.0)),
                   _float(data.get("margin_lower")), _float(data.get("seconds", 0.0)),
                   tuple(cex) if cex is not None else None, dict(data.get("details", {})))

    def dumps(self) -> str:
        """One JSON line."""
        return json.dumps(self.to_json())
