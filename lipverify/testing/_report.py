"""The conformance report: one result per check, and the error raised when some failed."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lipverify.errors import LipverifyError


class Outcome(enum.Enum):
    """How one check ended."""

    PASSED = "passed"
    FAILED = "failed"
    NOT_APPLICABLE = "not applicable"


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, outcome, a message (what was checked, or what went wrong), time."""

    name: str
    outcome: Outcome
    message: str
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        """True when the check failed."""
        return self.outcome == Outcome.FAILED


class ConformanceError(LipverifyError, AssertionError):
    """A backend failed the conformance kit (an `AssertionError`, so pytest shows the report)."""

    def __init__(self, report: BackendReport) -> None:
        self.report = report
        super().__init__(f"backend {report.backend!r} failed "
                         f"{len(report.failures)} conformance check(s):\n{report}")


@dataclass(frozen=True)
class BackendReport:
    """What `check_backend` found for one backend."""

    backend: str
    checks: tuple[CheckResult, ...]

    @property
    def passed(self) -> bool:
        """True when no check failed (not-applicable checks do not fail)."""
        return not self.failures

    @property
    def failures(self) -> tuple[CheckResult, ...]:
        """The failed checks."""
        return tuple(c for c in self.checks if c.failed)

    def outcome(self, name: str) -> Outcome:
        """The outcome of check `name`."""
        for check in self.checks:
            if check.name == name:
                return check.outcome
        raise KeyError(f"no check named {name!r}")

    def raise_for_failures(self) -> BackendReport:
        """`self` when every check passed, else `ConformanceError` with the whole report."""
        if self.failures:
            raise ConformanceError(self)
        return self

    def __str__(self) -> str:
        width = max((len(c.name) for c in self.checks), default=0)
        lines = [f"conformance of backend {self.backend!r}: "
                 f"{'passed' if self.passed else 'FAILED'}"]
        for c in self.checks:
            mark = {Outcome.PASSED: "ok  ", Outcome.FAILED: "FAIL",
                    Outcome.NOT_APPLICABLE: "n/a "}[c.outcome]
            body = c.message.replace("\n", "\n" + " " * (width + 8))
            lines.append(f"  {mark} {c.name:<{width}}  {body} ({c.seconds:.2f}s)")
        return "\n".join(lines)
