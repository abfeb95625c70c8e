"""One VNN-COMP instance: an ONNX network, a VNN-LIB property and a time limit to one answer.

The order: parse the property and check it fits the ONNX file; start loading the network (with
the loader's onnxruntime cross-check) and the backends, in a child process by default; meanwhile
try each box's centre with onnxruntime; run the falsifier on every box; then the verifying
backends, cheapest first, box by box, while time remains. `sat` is returned only with a
counterexample that onnxruntime confirms on the original ONNX file (`check.py`); `unsat` only
when a sound backend verified every box. Otherwise `unknown` or `timeout`; a problem with the
files is `error`: never a guess.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lipverify.errors import InputError, LipverifyError
from lipverify.network.network import Network
from lipverify.types import Status
from lipverify.vnncomp.check import Counterexample, OnnxOracle, check_counterexample
from lipverify.vnncomp.results import VnncompResult, result_from_status
from lipverify.vnncomp.vnnlib import VnnlibSpec, read_vnnlib
from lipverify.vnncomp.worker import (
    BackendOptions,
    BackendSummary,
    LocalBackends,
    OutOfTime,
    WorkerBackends,
    warm_up,
)

log = logging.getLogger(__name__)

# Backends that only falsify: they run first, on every box.
FALSIFIERS = ("attack",)
# The falsifier's extra rounds (after the verifiers) grow up to these.
MAX_RESTARTS = 64
MAX_STEPS = 200
# Below this many seconds left, no further backend is started.
MIN_BACKEND_SECONDS = 0.05
# Error messages are one line of at most this many characters.
MAX_MESSAGE = 400


def falsifier_round(round_: int) -> dict[str, int]:
    """Options of the falsifier's extra round `round_` (>= 1): a new seed, more restarts."""
    return {"seed": round_, "restarts": min(4 * 2 ** round_, MAX_RESTARTS),
            "steps": min(50 * (round_ + 1), MAX_STEPS)}


@dataclass(frozen=True)
class RunOptions:
    """How to run one instance.

    Args:
        timeout: Seconds for the whole instance (loading included).
        backends: Backend names to use; empty means every available backend.
        disabled: Backend names to leave out.
        isolate: Run the backends in a child process killed at the deadline.
        device: Torch device for the network ("cpu" or "cuda").
        backend_options: Options of each backend by name (a config's `backends.<name>`
            section), validated against that backend's `Options` when it is created.

    """

    timeout: float = 60.0
    backends: tuple[str, ...] = ()
    disabled: tuple[str, ...] = ()
    isolate: bool = True
    device: str = "cpu"
    backend_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise InputError(f"timeout must be positive, got {self.timeout}")


@dataclass(frozen=True)
class InstanceResult:
    """The answer for one instance, with its checked counterexample for `sat`."""

    result: VnncompResult
    seconds: float
    counterexample: Counterexample | None = None
    backend: str | None = None
    message: str = ""
    trace: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Prepared:
    """A parsed property, the ONNX oracle it was checked against, and the network if loaded."""

    spec: VnnlibSpec
    oracle: OnnxOracle
    network: Network | None


def prepare(onnx_path: str | Path, vnnlib_path: str | Path, device: str = "cpu",
            load: bool = True) -> Prepared:
    """Parse the property, open the network and check that they fit each other."""
    spec = read_vnnlib(vnnlib_path)
    oracle = OnnxOracle(onnx_path)
    for what, declared, actual in (("inputs", spec.num_inputs, oracle.num_inputs),
                                   ("outputs", spec.num_outputs, oracle.num_outputs)):
        if declared != actual:
            raise InputError(f"{spec.source} declares {declared} {what} but {onnx_path} has "
                             f"{actual}")
    network = None
    if load:
        options = BackendOptions(str(onnx_path), spec.num_inputs, spec.num_outputs,
                                 device=device)
        network = LocalBackends(options, create=False).network
    return Prepared(spec, oracle, network)


class _Instance:
    """The state of one run: boxes still open, the trace, whether time ran out."""

    def __init__(self, prepared: Prepared, options: RunOptions, start: float) -> None:
        self.spec, self.oracle = prepared.spec, prepared.oracle
        self.start = start
        self.deadline = start + options.timeout
        self.open = list(range(len(self.spec.cases)))
        self.trace: list[str] = []
        self.verified_by: set[str] = set()
        self.unusable: set[str] = set()
        self.timed_out = False

    def result(self, status: Status, **kw: object) -> InstanceResult:
        return InstanceResult(result_from_status(status), time.monotonic() - self.start,
                              trace=tuple(self.trace), **kw)

    def probe_centres(self) -> InstanceResult | None:
        for case in self.spec.cases:
            cex = check_counterexample(self.oracle, case, case.centre)
            if cex is not None:
                self.trace.append("centre: falsified")
                return self.result(Status.FALSIFIED, counterexample=cex, backend="centre")
        return None

    def run_backend(self, pool: LocalBackends | WorkerBackends, backend: BackendSummary,
                    index: int, round_: int = 0) -> InstanceResult | None:
        """Run one backend on one box; a confirmed counterexample ends the instance."""
        if self.deadline - time.monotonic() < MIN_BACKEND_SECONDS:
            self.timed_out = True
            return None
        case = self.spec.cases[index]
        begin = time.monotonic()
        overrides = falsifier_round(round_) if round_ else None
        cert, skipped = pool.certify(backend.name, case, self.deadline, overrides)
        note = f"{backend.name}{f' round {round_}' if round_ else ''} box {index}: " \
               f"{cert.status.value} ({time.monotonic() - begin:.2f}s)"
        if skipped:
            note += f", skipped: {skipped}"
            self.unusable.add(backend.name)
        match cert.status:
            case Status.FALSIFIED:
                cex = None
                if cert.counterexample is not None:
                    cex = check_counterexample(self.oracle, case, np.asarray(cert.counterexample))
                if cex is not None:
                    self.trace.append(note)
                    return self.result(Status.FALSIFIED, counterexample=cex,
                                       backend=backend.name)
                note += ", counterexample rejected by onnxruntime"
            case Status.VERIFIED if backend.sound:
                self.open.remove(index)
                self.verified_by.add(backend.name)
            case Status.VERIFIED:
                note += ", ignored: the backend is not sound"
            case Status.TIMEOUT:
                self.timed_out = True
            case Status.ERROR:
                note += f", {cert.details.get('error', 'error')}"
                self.unusable.add(backend.name)
            case Status.UNKNOWN:
                pass
        self.trace.append(note)
        log.info(note)
        return None

    def run(self, pool: LocalBackends | WorkerBackends,
            backends: list[BackendSummary]) -> InstanceResult:
        falsifiers = [b for b in backends if b.name in FALSIFIERS]
        verifiers = [b for b in backends if b.name not in FALSIFIERS]
        for backend in falsifiers:
            for index in list(self.open):
                found = self.run_backend(pool, backend, index)
                if found is not None:
                    return found
        for index in list(self.open):
            for backend in verifiers:
                found = self.run_backend(pool, backend, index)
                if found is not None:
                    return found
                if index not in self.open:
                    break
        round_ = 1
        while self.open and time.monotonic() < self.deadline - MIN_BACKEND_SECONDS:
            usable = [b for b in falsifiers if b.name not in self.unusable]
            if not usable:
                break
            for backend in usable:  # the verifiers are done: keep searching, other seeds
                for index in list(self.open):
                    found = self.run_backend(pool, backend, index, round_)
                    if found is not None:
                        return found
            round_ += 1
        if not self.open:
            return self.result(Status.VERIFIED, backend=",".join(sorted(self.verified_by)))
        if self.timed_out or time.monotonic() >= self.deadline:
            return self.result(Status.TIMEOUT)
        return self.result(Status.UNKNOWN)


def _solve(onnx_path: str | Path, vnnlib_path: str | Path, options: RunOptions,
           start: float) -> InstanceResult:
    if options.isolate:
        warm_up()  # the fork server imports torch while the property is parsed and probed
    prepared = prepare(onnx_path, vnnlib_path, options.device, load=False)
    state = _Instance(prepared, options, start)
    if not prepared.spec.cases:
        return state.result(Status.VERIFIED, backend="vnnlib")  # no input qualifies
    found = state.probe_centres()
    if found is not None:
        return found
    backend_options = BackendOptions(str(onnx_path), prepared.spec.num_inputs,
                                     prepared.spec.num_outputs, options.backends,
                                     options.disabled, options.device,
                                     _plain(_with_defaults(options.backend_options)))
    pool = WorkerBackends(backend_options) if options.isolate else LocalBackends(backend_options)
    try:
        try:
            summaries = pool.wait_ready(state.deadline)
        except OutOfTime:
            state.trace.append("out of time while loading the network")
            return state.result(Status.TIMEOUT)
        return state.run(pool, summaries)
    finally:
        pool.close()


# Backend options an instance run starts from (a config's sections override them key by key):
# branch and bound gets the whole instance, not the per-input share `certify` gives it, and an
# instance its first plain search leaves open gets tightened root bounds (mnist_fc at 300 s:
# 11 of the 29 instances a plain search leaves open are unsat in 60-206 s, 72/90 in all; see
# docs/branch-and-bound.md).
VNNCOMP_DEFAULTS: dict[str, dict[str, Any]] = {"bab": {"time_per_input": None, "tighten": 0.4}}


def _with_defaults(sections: Mapping[str, Mapping[str, Any]]
                   ) -> dict[str, Mapping[str, Any]]:
    """`VNNCOMP_DEFAULTS` updated by the given sections."""
    out: dict[str, Mapping[str, Any]] = {k: dict(v) for k, v in VNNCOMP_DEFAULTS.items()}
    for name, opts in sections.items():
        out[name] = {**out.get(name, {}), **dict(opts or {})}
    return out


def _plain(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Backend option sections as plain dicts (they are pickled to the backend process)."""
    return {name: dict(opts or {}) for name, opts in sections.items()}


def run_instance(onnx_path: str | Path, vnnlib_path: str | Path,
                 options: RunOptions | None = None) -> InstanceResult:
    """The answer for one instance; errors become an `error` result with a one-line message."""
    options = options or RunOptions()
    start = time.monotonic()
    try:
        return _solve(onnx_path, vnnlib_path, options, start)
    except LipverifyError as exc:
        message = str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure is `error`, never a wrong answer
        log.debug("instance failed", exc_info=True)
        message = f"{type(exc).__name__}: {exc}"
    return InstanceResult(VnncompResult.ERROR, time.monotonic() - start,
                          message=" ".join(message.split())[:MAX_MESSAGE] or "error")
