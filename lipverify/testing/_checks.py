"""The conformance checks. Each takes a `Session` and returns `(Outcome, message)`."""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lipverify.backends.registry import protocol_problems
from lipverify.errors import LipverifyError
from lipverify.testing._attack import Regions
from lipverify.testing._report import Outcome
from lipverify.testing._zoo import Case, ConformanceZoo, ProblemCase
from lipverify.types import Certificate, LipschitzBound, Norm, Status

# A Lipschitz bound may sit below a float64 reference by this much (the reference's rounding).
REFERENCE_REL_TOL = 1e-9
# A certified radius may exceed the distance of a float32 counterexample by this much.
RADIUS_REL_TOL = 1e-5
RADIUS_ABS_TOL = 1e-7
# Radii of the same input from different batches may differ by this much (float reductions).
BATCH_REL_TOL = 1e-5
BATCH_ABS_TOL = 1e-7
# Problems the batch and determinism checks re-run (the first accepted of each kind).
RERUN_KINDS = ("l2", "linf", "box")
MAX_LISTED = 5

Result = tuple[Outcome, str]


@dataclass(frozen=True)
class Run:
    """A backend's answer on one problem: `supports()`, then `certify()` if it accepted."""

    pcase: ProblemCase
    why: str | None
    certs: tuple[Certificate, ...] | None = None
    error: str | None = None

    @property
    def accepted(self) -> bool:
        """True when `supports()` returned None."""
        return self.why is None


def _describe(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _listed(problems: list[str]) -> str:
    head = "; ".join(problems[:MAX_LISTED])
    more = len(problems) - MAX_LISTED
    return head + (f"; ... and {more} more" if more > 0 else "")


class Session:
    """One backend under test, the zoo, and the backend's answers (computed once)."""

    def __init__(self, backend: object, factory: Callable[[], object], zoo: ConformanceZoo) -> None:
        self.backend = backend
        self.factory = factory
        self.zoo = zoo
        self.name = str(getattr(backend, "name", type(backend).__name__))
        self._runs: list[Run] | None = None
        self._bounds: dict[tuple[str, Norm], LipschitzBound | str] = {}

    @property
    def runs(self) -> list[Run]:
        """`supports` and `certify` on every zoo problem."""
        if self._runs is None:
            self._runs = [self._run(p) for p in self.zoo.problems]
        return self._runs

    def _run(self, pcase: ProblemCase) -> Run:
        net, prob = pcase.case.network, pcase.problem
        try:
            why = self.backend.supports(net, prob)
        except Exception as exc:  # noqa: BLE001 - reported as a failure of the check
            return Run(pcase, f"<supports() raised {_describe(exc)}>", error="supports")
        if why is not None:
            return Run(pcase, why)
        try:
            certs = self.backend.certify(net, prob)
        except Exception as exc:  # noqa: BLE001 - reported as a failure of the check
            return Run(pcase, None, error=_describe(exc))
        return Run(pcase, None, tuple(certs) if isinstance(certs, (list, tuple)) else certs)

    def accepted(self) -> list[Run]:
        """Runs whose `certify` answered."""
        return [r for r in self.runs if r.accepted and r.error is None
                and isinstance(r.certs, tuple) and len(r.certs) == len(r.pcase.problem)]

    def lipschitz(self, case: Case, norm: Norm) -> LipschitzBound | str:
        """The backend's bound, or why there is none (`"n/a: ..."` or `"error: ..."`)."""
        key = (case.name, norm)
        if key not in self._bounds:
            try:
                self._bounds[key] = self.backend.lipschitz(case.network, norm)
            except LipverifyError as exc:
                self._bounds[key] = f"n/a: {exc}"
            except Exception as exc:  # noqa: BLE001 - untyped errors are a failure
                self._bounds[key] = f"error: {_describe(exc)}"
        return self._bounds[key]

    @property
    def has_lipschitz(self) -> bool:
        """True when the backend has a callable `lipschitz`."""
        return callable(getattr(self.backend, "lipschitz", None))


def check_protocol(s: Session) -> Result:
    """Capabilities declared as data, with the right types; the methods exist."""
    problems = protocol_problems(type(s.backend))
    if problems:
        return Outcome.FAILED, "; ".join(problems)
    extra = "with lipschitz()" if s.has_lipschitz else "no lipschitz()"
    return Outcome.PASSED, f"cost {s.backend.cost}, norms " \
        f"{','.join(sorted(n.value for n in s.backend.norms))}, sound {s.backend.sound}, {extra}"


def _certificate_problems(s: Session, run: Run) -> list[str]:
    name = run.pcase.name
    if run.error is not None:
        return [f"{name}: supports() accepted it but certify raised {run.error}"]
    certs = run.certs
    if not isinstance(certs, tuple) or not all(isinstance(c, Certificate) for c in certs):
        return [f"{name}: certify returned {type(certs).__name__}, not a list of Certificate"]
    if len(certs) != len(run.pcase.problem):
        return [f"{name}: {len(certs)} certificates for {len(run.pcase.problem)} inputs"]
    out = []
    for i, c in enumerate(certs):
        if c.status == Status.ERROR:
            out.append(f"{name}[{i}]: status error after supports() accepted it "
                       f"({dict(c.details)})")
        if not isinstance(c.radius, (int, float)) or math.isnan(c.radius) or c.radius < 0:
            out.append(f"{name}[{i}]: radius {c.radius!r} is not a number >= 0")
        if c.backend != s.name:
            out.append(f"{name}[{i}]: certificate says backend {c.backend!r}")
        if c.status == Status.VERIFIED and not s.backend.sound:
            out.append(f"{name}[{i}]: an estimate (sound=False) answered verified")
    return out


def check_supports_honest(s: Session) -> Result:
    """`certify` answers (no raise, no error status) on every problem `supports` accepts."""
    problems, rejected = [], {}
    for run in s.runs:
        if run.error == "supports":
            problems.append(f"{run.pcase.name}: {run.why[1:-1]}")
        elif run.why is not None:
            if not isinstance(run.why, str) or not run.why.strip():
                problems.append(f"{run.pcase.name}: supports() returned {run.why!r}, "
                                "not None or a reason")
            else:
                rejected.setdefault(run.pcase.case.name, run.why)
        else:
            problems.extend(_certificate_problems(s, run))
    accepted = sum(r.accepted for r in s.runs)
    if problems:
        return Outcome.FAILED, _listed(problems)
    if not accepted:
        return Outcome.FAILED, f"supports() accepted none of the {len(s.runs)} problems " \
                               f"(e.g. {next(iter(rejected.values()), '?')}): nothing to check"
    why = "; ".join(f"{k}: {v}" for k, v in list(rejected.items())[:3])
    return Outcome.PASSED, f"accepted {accepted} of {len(s.runs)} problems" + \
        (f"; rejected e.g. {why}" if why else "")


def check_counterexamples(s: Session) -> Result:
    """Every `falsified` answer carries a counterexample inside the region that really violates."""
    problems, count = [], 0
    for run in s.accepted():
        prob, net = run.pcase.problem, run.pcase.case.network
        for i, c in enumerate(run.certs):
            if c.status != Status.FALSIFIED:
                if c.status == Status.VERIFIED and c.counterexample is not None:
                    problems.append(f"{run.pcase.name}[{i}]: verified with a counterexample")
                continue
            count += 1
            if c.counterexample is None:
                problems.append(f"{run.pcase.name}[{i}]: falsified without a counterexample")
                continue
            x = np.asarray(c.counterexample, np.float64)
            if x.size != net.input_size:
                problems.append(f"{run.pcase.name}[{i}]: counterexample has {x.size} values")
                continue
            region = Regions.of(prob.perturbation, prob.inputs).subset([i])
            point = x.reshape((1, *net.input_shape))
            if not region.contains(point)[0]:
                problems.append(f"{run.pcase.name}[{i}]: counterexample outside the region "
                                f"(distance {region.distance(point)[0]:.3g} > "
                                f"eps {prob.perturbation.eps:.3g})")
            y = net.forward(x.reshape((1, *net.input_shape)).astype(np.float32))[0]
            if not prob.properties[i].violated(y):
                problems.append(f"{run.pcase.name}[{i}]: counterexample does not violate the "
                                f"property (margin {prob.properties[i].margin(y):.3g})")
    if problems:
        return Outcome.FAILED, _listed(problems)
    if not count:
        return Outcome.NOT_APPLICABLE, "no falsified answer to check"
    return Outcome.PASSED, f"{count} counterexamples inside their regions and violating"


def check_sound_vs_attack(s: Session) -> Result:
    """No attack counterexample inside a verified region or closer than a certified radius."""
    problems, verified, radii = [], 0, 0
    for run in s.accepted():
        prob = run.pcase.problem
        regions = Regions.of(prob.perturbation, prob.inputs)
        for i, c in enumerate(run.certs):
            if c.status == Status.VERIFIED:
                verified += 1
                cex = s.zoo.attack(run.pcase)[i]
                if cex is not None and regions.subset([i]).contains(cex[None])[0]:
                    dist = regions.subset([i]).distance(cex[None])[0]
                    problems.append(f"{run.pcase.name}[{i}]: verified, but the attack found a "
                                    f"counterexample at distance {dist:.6g} "
                                    f"(eps {prob.perturbation.eps:.6g})")
            if c.radius > 0 and not prob.perturbation.is_box:
                radii += 1
                found = s.zoo.nearest_counterexamples(run.pcase)[i]
                if found is not None and c.radius > found[0] * (1 + RADIUS_REL_TOL) + \
                        RADIUS_ABS_TOL:
                    problems.append(f"{run.pcase.name}[{i}]: certified radius {c.radius:.6g} "
                                    f"> distance {found[0]:.6g} of a counterexample")
    if problems:
        return Outcome.FAILED, _listed(problems)
    if not verified and not radii:
        return Outcome.NOT_APPLICABLE, "no verified answer or positive radius to attack"
    return Outcome.PASSED, f"{verified} verified answers and {radii} radii survive the attack"


def _reruns(s: Session) -> list[Run]:
    picked, seen = [], set()
    for run in s.accepted():
        if run.pcase.kind in RERUN_KINDS and run.pcase.kind not in seen:
            seen.add(run.pcase.kind)
            picked.append(run)
    return picked


def _same(a: Certificate, b: Certificate, eps: float, rtol: float, atol: float) -> str | None:
    close = math.isclose(a.radius, b.radius, rel_tol=rtol, abs_tol=atol) or \
        (math.isinf(a.radius) and a.radius == b.radius)
    if not close:
        return f"radius {a.radius:.9g} vs {b.radius:.9g}"
    if a.status != b.status and not math.isclose(a.radius, eps, rel_tol=rtol, abs_tol=atol):
        return f"status {a.status.value} vs {b.status.value}"
    return None


def _compare(name: str, ref: tuple[Certificate, ...], certs: list[Certificate],
             index: list[int], eps: float, rtol: float, atol: float) -> list[str]:
    if len(certs) != len(index):
        return [f"{name}: {len(certs)} certificates for {len(index)} inputs"]
    out = []
    for j, c in zip(index, certs, strict=True):
        diff = _same(ref[j], c, eps, rtol, atol)
        if diff:
            out.append(f"{name}[{j}]: {diff}")
    return out


def check_batch_invariance(s: Session) -> Result:
    """The same answers for an input alone, in a reversed batch, and in the full batch."""
    problems, count = [], 0
    for run in _reruns(s):
        prob = run.pcase.problem
        n = len(prob)
        layouts = [list(range(n))[::-1]] + [[i] for i in range(n)]
        for index in layouts:
            try:
                certs = s.backend.certify(run.pcase.case.network, prob.subset(index))
            except Exception as exc:  # noqa: BLE001 - reported
                problems.append(f"{run.pcase.name} inputs {index}: certify raised "
                                f"{_describe(exc)}")
                continue
            count += 1
            problems += _compare(f"{run.pcase.name} batch {index}", run.certs, list(certs),
                                 index, prob.perturbation.eps, BATCH_REL_TOL, BATCH_ABS_TOL)
    if problems:
        return Outcome.FAILED, _listed(problems)
    if not count:
        return Outcome.NOT_APPLICABLE, "no accepted robustness problem to re-run"
    return Outcome.PASSED, f"{count} re-batched runs agree"


def check_determinism(s: Session) -> Result:
    """A fresh instance with the same options (seed) gives the same answers and bounds."""
    problems, count = [], 0
    try:
        fresh = s.factory()
    except Exception as exc:  # noqa: BLE001 - reported
        return Outcome.FAILED, f"cannot make a second instance: {_describe(exc)}"
    for run in _reruns(s):
        prob = run.pcase.problem
        try:
            certs = fresh.certify(run.pcase.case.network, prob)
        except Exception as exc:  # noqa: BLE001 - reported
            problems.append(f"{run.pcase.name}: certify raised {_describe(exc)}")
            continue
        count += 1
        problems += _compare(f"{run.pcase.name} (fresh instance)", run.certs, list(certs),
                             list(range(len(prob))), prob.perturbation.eps, 1e-9, 1e-12)
    if s.has_lipschitz:
        for case in s.zoo.cases:
            norm = sorted(s.backend.norms, key=lambda n: n.value)[0]
            first = s.lipschitz(case, norm)
            if not isinstance(first, LipschitzBound):
                continue
            again = fresh.lipschitz(case.network, norm)
            count += 1
            if not math.isclose(first.value, again.value, rel_tol=1e-9):
                problems.append(f"{case.name}: lipschitz {first.value:.12g} then "
                                f"{again.value:.12g}")
            break
    if problems:
        return Outcome.FAILED, _listed(problems)
    if not count:
        return Outcome.NOT_APPLICABLE, "nothing accepted to re-run"
    return Outcome.PASSED, f"{count} re-runs on a fresh instance agree"


def _bound_problems(s: Session, case: Case, norm: Norm, bound: LipschitzBound) -> list[str]:
    label = f"{case.name}/{norm.value}"
    if not isinstance(bound, LipschitzBound):
        return [f"{label}: lipschitz returned {type(bound).__name__}"]
    out = []
    if not isinstance(bound.value, float) or math.isnan(bound.value) or bound.value < 0:
        out.append(f"{label}: value {bound.value!r} is not a float >= 0")
    if bound.norm != norm:
        out.append(f"{label}: asked for norm {norm.value}, got {bound.norm}")
    if bound.backend != s.name:
        out.append(f"{label}: bound says backend {bound.backend!r}")
    if bound.sound != s.backend.sound:
        out.append(f"{label}: bound.sound={bound.sound} but the backend declares "
                   f"sound={s.backend.sound}")
    return out


def _lipschitz_check(s: Session, reference: Callable[[Case, Norm], float | None],
                     what: str) -> Result:
    if not s.has_lipschitz:
        return Outcome.NOT_APPLICABLE, "no lipschitz() method"
    if not s.backend.sound:
        return Outcome.NOT_APPLICABLE, "the backend gives estimates (sound=False), not bounds"
    problems, done, skipped = [], [], []
    for case in s.zoo.cases:
        for norm in sorted(s.backend.norms, key=lambda n: n.value):
            ref = reference(case, norm)
            if ref is None:
                continue
            bound = s.lipschitz(case, norm)
            label = f"{case.name}/{norm.value}"
            if isinstance(bound, str):
                if bound.startswith("error"):
                    problems.append(f"{label}: lipschitz raised an untyped {bound[7:]}")
                else:
                    skipped.append(label)
                continue
            problems += _bound_problems(s, case, norm, bound)
            if bound.value < ref * (1 - REFERENCE_REL_TOL):
                problems.append(f"{label}: bound {bound.value:.9g} < {what} {ref:.9g}")
            else:
                done.append(f"{label} {bound.value / ref:.3g}x" if ref > 0 else label)
    if problems:
        return Outcome.FAILED, _listed(problems)
    if not done:
        return Outcome.NOT_APPLICABLE, f"lipschitz() declined every net ({', '.join(skipped)})"
    return Outcome.PASSED, f"bound >= {what} (bound/reference): {', '.join(done)}"


def check_lipschitz_exact(s: Session) -> Result:
    """`lipschitz()` is at least the exact constant of tiny piecewise-linear and linear nets."""
    return _lipschitz_check(s, s.zoo.exact_lipschitz, "exact value")


def check_lipschitz_sampled(s: Session) -> Result:
    """`lipschitz()` is at least every sampled Jacobian norm and difference quotient."""
    return _lipschitz_check(s, s.zoo.sampled_lipschitz, "sampled lower bound")


CHECKS: dict[str, Callable[[Session], Result]] = {
    "protocol": check_protocol,
    "supports_honest": check_supports_honest,
    "counterexamples": check_counterexamples,
    "sound_vs_attack": check_sound_vs_attack,
    "batch_invariance": check_batch_invariance,
    "determinism": check_determinism,
    "lipschitz_exact": check_lipschitz_exact,
    "lipschitz_sampled": check_lipschitz_sampled,
}

