"""The backend registry, built from the `lipverify.backends` entry points.

Built-in and third-party backends are found the same way: an entry point in the group
`lipverify.backends` whose name is the backend's name and whose value is its class
(`spectral = "lipverify.backends.spectral:SpectralBackend"`).

- Entries are imported only when selected (`load`, `create`) or when `status` is asked for.
- Each entry records the distribution that provides it (`"lipverify-eclipse 0.1.0"`).
- A failing import, a class that does not implement the verifier protocol, a missing required
  module or a constructor that raises make a backend "unavailable: <reason>"; never a crash of
  the registry (the other backends stay usable).
- A name registered by two different entry points is rejected: it stays listed, unavailable,
  naming both providers, and `create` raises `DuplicateBackendError`.
- `disabled` names (`--disable-backend NAME`) are left out entirely.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lipverify.backends.base import Verifier
from lipverify.errors import BackendUnavailable, InputError
from lipverify.types import Norm

log = logging.getLogger(__name__)

GROUP = "lipverify.backends"
# The verifier protocol: class attributes read without running anything, and methods.
CAPABILITY_ATTRS = ("name", "cost", "norms", "sound", "requires")
METHOD_ATTRS = ("supports", "certify")
# Kept for code that imported it before the protocol check became `validate_backend_class`.
_REQUIRED_ATTRS = CAPABILITY_ATTRS + METHOD_ATTRS


class BackendValidationError(BackendUnavailable):
    """A loaded entry point that does not implement the verifier protocol."""


class DuplicateBackendError(InputError):
    """Two different entry points register the same backend name."""


def protocol_problems(cls: object, name: str | None = None) -> list[str]:
    """What keeps `cls` from implementing the verifier protocol (empty when nothing does).

    Checks that `cls` is a class with the capability attributes of the right types (`name` a
    lowercase str equal to the entry-point `name` when given, `cost` an int, `norms` a non-empty
    set of `Norm`, `sound` a bool, `requires` a tuple of module names) and callable `supports`,
    `certify` (and `lipschitz` when present).
    """
    if not isinstance(cls, type):
        return [f"{cls!r} is not a class"]
    problems = [f"missing {a}" for a in _REQUIRED_ATTRS if not hasattr(cls, a)]
    if problems:
        return problems
    own = cls.name
    if not isinstance(own, str) or not own or own != own.lower() or own != own.strip():
        problems.append(f"name must be a non-empty lowercase str, got {own!r}")
    elif name is not None and own != name:
        problems.append(f"class says its name is {own!r}, the entry point says {name!r}")
    if not isinstance(cls.cost, int) or isinstance(cls.cost, bool):
        problems.append(f"cost must be an int, got {cls.cost!r}")
    norms = cls.norms
    if not isinstance(norms, (frozenset, set)) or not norms or \
            not all(isinstance(n, Norm) for n in norms):
        problems.append(f"norms must be a non-empty frozenset of Norm, got {norms!r}")
    if not isinstance(cls.sound, bool):
        problems.append(f"sound must be a bool, got {cls.sound!r}")
    req = cls.requires
    if not isinstance(req, tuple) or not all(isinstance(r, str) and r for r in req):
        problems.append(f"requires must be a tuple of module names, got {req!r}")
    for method in (*METHOD_ATTRS, "lipschitz"):
        if hasattr(cls, method) and not callable(getattr(cls, method)):
            problems.append(f"{method} is not callable")
    return problems


def validate_backend_class(cls: object, name: str | None = None) -> type:
    """`cls` itself when it implements the verifier protocol, else `BackendValidationError`."""
    problems = protocol_problems(cls, name)
    if problems:
        label = name or getattr(cls, "__name__", repr(cls))
        raise BackendValidationError(f"{label}: does not implement the verifier protocol: "
                                     f"{'; '.join(problems)}")
    return cls  # type: ignore[return-value]


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The module names in `modules` that cannot be imported here (checked without importing)."""
    missing = []
    for mod in modules:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):  # a missing parent package, or an empty name
            found = False
        if not found:
            missing.append(mod)
    return missing


def _distribution_label(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown"
    name = getattr(dist, "name", None) or dist.metadata["Name"]
    return f"{name} {dist.version}"


@dataclass(frozen=True)
class BackendEntry:
    """One registered backend: its entry point and the distribution that provides it.

    `cls` stands in for the entry point when a backend is registered directly (tests, or a
    program that builds its own registry).
    """

    name: str
    value: str
    distribution: str
    entry_point: Any = field(default=None, compare=False)
    cls: type | None = field(default=None, compare=False)

    @classmethod
    def from_class(cls, backend: type, distribution: str = "local") -> BackendEntry:
        """An entry for a class registered directly rather than through an entry point."""
        value = f"{backend.__module__}:{backend.__qualname__}"
        return cls(str(getattr(backend, "name", backend.__name__)), value, distribution,
                   cls=backend)

    def load(self) -> type:
        """Import the backend class and validate it against the protocol.

        Raises:
            BackendUnavailable: the import failed (the message says why), or the object does not
                implement the protocol (`BackendValidationError`).
        """
        if self.cls is not None:
            obj: object = self.cls
        elif self.entry_point is None:
            raise BackendUnavailable(f"{self.name}: unavailable: no entry point or class")
        else:
            try:
                obj = self.entry_point.load()
            except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable
                raise BackendUnavailable(f"{self.name}: unavailable: cannot load {self.value}: "
                                         f"{type(exc).__name__}: {exc}") from exc
        problems = protocol_problems(obj, self.name)
        if problems:
            raise BackendValidationError(f"{self.name}: unavailable: {self.value} does not "
                                         f"implement the verifier protocol: "
                                         f"{'; '.join(problems)}")
        return obj  # type: ignore[return-value]


@dataclass(frozen=True)
class BackendInfo:
    """What `lipverify backends` shows for one backend; `why` is None when it can run here."""

    name: str
    distribution: str
    value: str
    why: str | None
    cost: int | None = None
    sound: bool | None = None
    norms: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        """True when the backend can run in this environment."""
        return self.why is None


def _reason(exc: BaseException) -> str:
    """The part of a `BackendUnavailable` message after `NAME: unavailable: `."""
    text = str(exc)
    marker = ": unavailable: "
    return text.split(marker, 1)[1] if marker in text else text


class BackendRegistry:
    """The backends known in this environment, by name (an object, never a module global)."""

    def __init__(self, entries: Iterable[BackendEntry], disabled: Iterable[str] = ()) -> None:
        self.disabled = frozenset(d.strip() for d in disabled)
        self._entries: dict[str, BackendEntry] = {}
        self._conflicts: dict[str, list[BackendEntry]] = {}
        for entry in entries:
            if entry.name in self.disabled:
                continue
            known = self._entries.get(entry.name)
            if known is None:
                self._entries[entry.name] = entry
            elif (known.value, known.distribution) != (entry.value, entry.distribution):
                self._conflicts.setdefault(entry.name, [known]).append(entry)
                log.warning("backend name %r registered twice: %s", entry.name,
                            self._conflict_text(entry.name))

    @classmethod
    def from_entry_points(cls, disabled: Iterable[str] = (),
                          group: str = GROUP) -> BackendRegistry:
        """Every backend declared under the entry-point `group` (nothing is imported yet)."""
        entries = [BackendEntry(ep.name, ep.value, _distribution_label(ep), ep)
                   for ep in importlib.metadata.entry_points(group=group)]
        disabled = list(disabled)
        unknown = sorted(set(disabled) - {e.name for e in entries})
        if unknown:
            log.warning("--disable-backend names no registered backend: %s", ", ".join(unknown))
        return cls(entries, disabled)

    @classmethod
    def from_classes(cls, classes: Iterable[type], disabled: Iterable[str] = ()) -> BackendRegistry:
        """A registry of classes registered directly (tests, embedding programs)."""
        return cls((BackendEntry.from_class(c) for c in classes), disabled)

    def _conflict_text(self, name: str) -> str:
        return " and ".join(f"{e.distribution} ({e.value})" for e in self._conflicts[name])

    @property
    def names(self) -> list[str]:
        """Names of the enabled backends (unavailable ones included)."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> BackendEntry:
        """The entry of `name`.

        Raises:
            InputError: `name` is disabled or unknown (the message lists the known names).
            DuplicateBackendError: two entry points register `name`.
        """
        if name in self.disabled:
            raise InputError(f"backend {name!r} is disabled (--disable-backend)")
        if name in self._conflicts:
            raise DuplicateBackendError(f"backend name {name!r} registered twice: by "
                                        f"{self._conflict_text(name)}; uninstall one of them")
        if name not in self._entries:
            raise InputError(f"unknown backend {name!r}; known: {', '.join(self.names)}")
        return self._entries[name]

    def load(self, name: str) -> type:
        """The validated class of backend `name` (imported now)."""
        return self.entry(name).load()

    def create(self, name: str, options: object | None = None) -> Verifier:
        """An instance of backend `name` (imported now).

        Raises:
            BackendUnavailable: it cannot be imported, does not implement the protocol, or its
                constructor fails.
        """
        cls = self.load(name)
        try:
            return cls(options) if options is not None else cls()
        except Exception as exc:  # noqa: BLE001 - a failing constructor makes it unavailable
            raise BackendUnavailable(f"{name}: unavailable: constructor failed: "
                                     f"{type(exc).__name__}: {exc}") from exc

    def create_many(self, names: Iterable[str]) -> list[Verifier]:
        """Instances of several backends (each name once), cheapest first."""
        backends = [self.create(n) for n in dict.fromkeys(names)]
        return sorted(backends, key=lambda b: b.cost)

    def info(self, name: str) -> BackendInfo:
        """Provenance, capabilities and availability of `name`; loads it, never raises for it."""
        if name in self._conflicts:
            entry = self._entries[name]
            return BackendInfo(name, " + ".join(e.distribution for e in self._conflicts[name]),
                               entry.value, f"registered twice: by {self._conflict_text(name)}")
        entry = self.entry(name)
        try:
            cls = entry.load()
        except BackendUnavailable as exc:
            return BackendInfo(name, entry.distribution, entry.value, _reason(exc))
        caps: dict[str, Any] = {"cost": cls.cost, "sound": cls.sound,
                                "norms": tuple(sorted(n.value for n in cls.norms))}
        missing = missing_modules(cls.requires)
        if missing:
            return BackendInfo(name, entry.distribution, entry.value,
                               f"missing module(s): {', '.join(missing)}", **caps)
        try:
            backend = cls()
            why = backend.availability() if hasattr(backend, "availability") else None
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            why = f"constructor failed: {type(exc).__name__}: {exc}"
        return BackendInfo(name, entry.distribution, entry.value, why, **caps)

    def infos(self) -> list[BackendInfo]:
        """`info` of every enabled backend, by name."""
        return [self.info(n) for n in self.names]

    def status(self) -> list[tuple[str, str, str | None]]:
        """(name, distribution, None or why unavailable) for every enabled backend."""
        return [(i.name, i.distribution, i.why) for i in self.infos()]

    def available_names(self) -> list[str]:
        """Names of the enabled backends that can run here."""
        return [i.name for i in self.infos() if i.available]
