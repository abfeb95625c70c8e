"""The verifier protocol every backend implements, and a small base class with its defaults."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

from lipverify.network.network import Network
from lipverify.types import Certificate, LipschitzBound, Norm, Problem, Scope


@runtime_checkable
class Verifier(Protocol):
    """What the orchestrator needs of a backend.

    Capabilities are class attributes read without running anything: `name` (lowercase, the
    entry-point name), `cost` (cheaper runs first), `norms`, `scopes`, `sound` (False for
    estimates), `requires` (importable module names).
    """

    name: ClassVar[str]
    cost: ClassVar[int]
    norms: ClassVar[frozenset[Norm]]
    sound: ClassVar[bool]
    requires: ClassVar[tuple[str, ...]]

    def supports(self, network: Network, problem: Problem) -> str | None:
        """None when this backend can run on the problem, else why not (one line)."""
        ...

    def certify(self, network: Network, problem: Problem) -> list[Certificate]:
        """One certificate per input of `problem`, in order."""
        ...


@runtime_checkable
class LipschitzProvider(Protocol):
    """A backend that also bounds the global Lipschitz constant of a network."""

    def lipschitz(self, network: Network, norm: Norm) -> LipschitzBound:
        """A bound on the Lipschitz constant of the whole network in `norm`."""
        ...


@dataclass(frozen=True)
class BackendOptions:
    """Options shared by every backend (a backend's own `Options` extends this)."""

    seed: int = 0
    timeout: float | None = None


class BackendBase:
    """Defaults for the protocol's capability attributes and a dependency check.

    Subclasses set `name`, `cost` and the capabilities, and implement `certify` (and, for
    Lipschitz backends, `lipschitz`).
    """

    name: ClassVar[str] = "base"
    cost: ClassVar[int] = 100
    norms: ClassVar[frozenset[Norm]] = frozenset({Norm.L2, Norm.LINF})
    scopes: ClassVar[frozenset[Scope]] = frozenset()
    sound: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = BackendOptions

    def __init__(self, options: object | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def missing_requirements(cls) -> list[str]:
        """Required modules that cannot be imported here."""
        return [mod for mod in cls.requires if importlib.util.find_spec(mod) is None]

    def availability(self) -> str | None:
        """None when the backend can run in this environment, else why not."""
        missing = self.missing_requirements()
        return f"missing module(s): {', '.join(missing)}" if missing else None

    def supports(self, network: Network, problem: Problem) -> str | None:
        """Default: available and the problem's norm is one this backend handles."""
        why = self.availability()
        if why:
            return why
        if problem.perturbation.norm not in self.norms:
            return f"{self.name} does not handle the {problem.perturbation.norm.value} norm"
        return None
