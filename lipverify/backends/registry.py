"""The backend registry, built from the `lipverify.backends` entry points.

Entries are loaded only when selected; a failing load becomes "unavailable: reason" instead of a
crash; duplicate names are rejected; each loaded class is checked against the `Verifier`
protocol; disabled names are left out.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass, field

from lipverify.backends.base import Verifier
from lipverify.errors import BackendUnavailable, InputError

GROUP = "lipverify.backends"
_REQUIRED_ATTRS = ("name", "cost", "norms", "sound", "requires", "supports", "certify")


@dataclass(frozen=True)
class BackendEntry:
    """One registered backend: its entry point and the distribution that provides it."""

    name: str
    value: str
    distribution: str
    entry_point: importlib.metadata.EntryPoint | None = field(default=None, compare=False)
    cls: type | None = field(default=None, compare=False)

    def load(self) -> type:
        """Import the backend class and validate it against the protocol."""
        if self.cls is not None:
            cls = self.cls
        else:
            try:
                cls = self.entry_point.load()
            except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable
                raise BackendUnavailable(f"{self.name}: unavailable: {type(exc).__name__}: "
                                         f"{exc}") from exc
        missing = [a for a in _REQUIRED_ATTRS if not hasattr(cls, a)]
        if missing:
            raise BackendUnavailable(f"{self.name}: unavailable: {self.value} does not "
                                     f"implement the verifier protocol (missing "
                                     f"{', '.join(missing)})")
        if getattr(cls, "name", None) != self.name:
            raise BackendUnavailable(f"{self.name}: unavailable: class says its name is "
                                     f"{getattr(cls, 'name', None)!r}")
        return cls


class BackendRegistry:
    """The backends known in this environment, by name."""

    def __init__(self, entries: Iterable[BackendEntry], disabled: Iterable[str] = ()) -> None:
        self._entries: dict[str, BackendEntry] = {}
        self.disabled = frozenset(disabled)
        for entry in entries:
            if entry.name in self._entries:
                other = self._entries[entry.name]
                raise InputError(f"backend name {entry.name!r} registered twice: by "
                                 f"{other.distribution} ({other.value}) and by "
                                 f"{entry.distribution} ({entry.value})")
            self._entries[entry.name] = entry

    @classmethod
    def from_entry_points(cls, disabled: Iterable[str] = ()) -> BackendRegistry:
        """Every backend declared under the `lipverify.backends` entry-point group."""
        entries = []
        for ep in importlib.metadata.entry_points(group=GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = f"{dist.name} {dist.version}" if dist is not None else "unknown"
            entries.append(BackendEntry(ep.name, ep.value, dist_name, ep))
        return cls(entries, disabled)

    @property
    def names(self) -> list[str]:
        """Names of enabled backends."""
        return sorted(n for n in self._entries if n not in self.disabled)

    def entry(self, name: str) -> BackendEntry:
        """The entry of `name`, or an error listing the known names."""
        if name in self.disabled:
            raise InputError(f"backend {name!r} is disabled")
        if name not in self._entries:
            raise InputError(f"unknown backend {name!r}; known: {', '.join(self.names)}")
        return self._entries[name]

    def create(self, name: str, options: object | None = None) -> Verifier:
        """An instance of backend `name` (loaded now)."""
        cls = self.entry(name).load()
        return cls(options) if options is not None else cls()

    def create_many(self, names: Iterable[str]) -> list[Verifier]:
        """Instances of several backends, cheapest first."""
        backends = [self.create(n) for n in names]
        return sorted(backends, key=lambda b: b.cost)

    def status(self) -> list[tuple[str, str, str | None]]:
        """(name, distribution, None or why unavailable) for every enabled backend."""
        rows = []
        for name in self.names:
            entry = self._entries[name]
            try:
                backend = entry.load()()
                why = backend.availability() if hasattr(backend, "availability") else None
            except BackendUnavailable as exc:
                why = str(exc).split(": ", 1)[1]
            rows.append((name, entry.distribution, why))
        return rows
