"""The backends of one instance, in this process or in a child the runner kills at the deadline.

Backends are asked to stop at `Problem.deadline`, but a solver deep in C code may not look, and
the competition's limit is hard. So by default the network is loaded and the backends run in a
child process started from a fork server (a clean process that never ran torch: forking a
process whose OpenMP pool is running deadlocks), and a late child is killed. The child dies
with its parents too (Linux `PR_SET_PDEATHSIG`), so a runner killed by the harness leaves no
backend running into the next instance.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import importlib.metadata
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from lipverify.errors import BackendUnavailable, InputError, LipverifyError
from lipverify.types import Certificate, Perturbation, Problem, Status
from lipverify.vnncomp.vnnlib import SpecCase

log = logging.getLogger(__name__)

# Imported once by the fork server, so each child starts without paying for them (with the
# modules of the registered backends; a module that fails to import is skipped there).
PRELOAD = ("torch", "lipverify.vnncomp.worker", "lipverify.orchestrator",
           "lipverify.network.load", "lipverify.network.onnx_import")
# Imported by the first torch optimiser (alpha-CROWN, l2prop): ~2 s, which a backend running in
# this process would spend past its deadline. Not preloaded by the fork server (its start would
# hold up the child's).
OPTIMISER_IMPORT = "torch._dynamo"
_PR_SET_PDEATHSIG = 1
# Backends get each box rounded outward to values of this type (see `backend_problem`).
BACKEND_DTYPE = np.float32


class WorkerError(LipverifyError):
    """The child failed to load the network or its backends (the message says why)."""


class OutOfTime(LipverifyError):
    """The deadline passed before the child was ready."""


@dataclass(frozen=True)
class BackendOptions:
    """What to load in the child.

    Args:
        onnx_path: The network file.
        num_inputs: Inputs the property declares (checked against the loaded network).
        num_outputs: Outputs the property declares.
        backends: Backend names; empty means every available one.
        disabled: Backend names to leave out.
        device: Torch device name.
        backend_options: Options of each backend by name, built into its `Options` (an
            unknown key is an error naming `backends.<name>.<key>`).
        log_level: Logging level in the child (the parent's by default).

    """

    onnx_path: str
    num_inputs: int
    num_outputs: int
    backends: tuple[str, ...] = ()
    disabled: tuple[str, ...] = ()
    device: str = "cpu"
    backend_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    log_level: int = field(default_factory=lambda: logging.getLogger().getEffectiveLevel())


@dataclass(frozen=True)
class BackendSummary:
    """What the parent needs to know of a backend."""

    name: str
    cost: int
    sound: bool


class LocalBackends:
    """The network (loaded and size-checked) and its backends, in this process."""

    def __init__(self, options: BackendOptions, create: bool = True) -> None:
        import torch

        from lipverify.network.load import load_network

        network = load_network(options.onnx_path, device=torch.device(options.device))
        for what, declared, actual in (("inputs", options.num_inputs, network.input_size),
                                       ("outputs", options.num_outputs, network.num_outputs)):
            if declared != actual:
                raise InputError(f"the property declares {declared} {what} but "
                                 f"{options.onnx_path} has {actual}")
        self.network = network
        self.backends = {b.name: b for b in _create(options)} if create else {}
        if create:
            importlib.import_module(OPTIMISER_IMPORT)

    @property
    def summaries(self) -> list[BackendSummary]:
        """The backends, cheapest first."""
        return sorted((BackendSummary(b.name, int(b.cost), bool(b.sound))
                       for b in self.backends.values()), key=lambda s: (s.cost, s.name))

    def wait_ready(self, deadline: float) -> list[BackendSummary]:
        """The backends (already loaded in this process)."""
        return self.summaries

    def certify(self, name: str, case: SpecCase, deadline: float,
                overrides: Mapping[str, Any] | None = None) -> tuple[Certificate, str | None]:
        """Backend `name` on one box (and why it skipped, if it did).

        `overrides` replaces fields of the backend's options for this call (names its options
        do not have are ignored), e.g. another seed for another round of the falsifier.
        """
        from lipverify.orchestrator import run_cascade

        backend = self.backends[name]
        if overrides and dataclasses.is_dataclass(backend.options):
            known = {f.name for f in dataclasses.fields(backend.options)}
            changes = {k: v for k, v in overrides.items() if k in known}
            backend = type(backend)(dataclasses.replace(backend.options, **changes))
        outcome = run_cascade(self.network, backend_problem(case, self.network.input_shape,
                                                            deadline), [backend])
        return outcome.best[0], outcome.skipped.get(name)

    def close(self) -> None:
        """Nothing to release."""


def backend_problem(case: SpecCase, input_shape: tuple[int, ...],
                    deadline: float | None = None) -> Problem:
    """The problem the backends see for one box: the box rounded outward to float32.

    Some backends take their box in float32 (the falsifier's search, float32 layer views), and
    a float64 bound converted to float32 rounds to the nearest value, which may lie inside the
    box: the bounds would then cover a smaller box than the one `unsat` speaks of. A box of
    float32 values survives those conversions unchanged, so its bounds hold on the whole box;
    the falsifier may use its float32 points, at most one float32 step outside the box (within
    the competition's tolerance, which `check.py` enforces).
    """
    box = case.rounded_out(BACKEND_DTYPE)
    shape = (1, *input_shape)
    return Problem(box.centre.reshape(shape), (box.prop,),
                   Perturbation.box(box.lower.reshape(shape), box.upper.reshape(shape)),
                   deadline=deadline)


def _create(options: BackendOptions) -> list[Any]:
    """Create the backends to run with their options (unavailable ones left out unless named)."""
    from lipverify.backends.registry import BackendRegistry
    from lipverify.config import backend_options

    registry = BackendRegistry.from_entry_points(disabled=options.disabled)
    chosen = options.backends or tuple(registry.names)
    out = []
    for name in chosen:
        try:
            cls = registry.load(name)
            opts = backend_options(name, getattr(cls, "Options", None),
                                   options.backend_options.get(name))
            backend = registry.create(name, opts)
            why = backend.availability() if hasattr(backend, "availability") else None
            if why is not None:
                raise BackendUnavailable(f"{name}: unavailable: {why}")
        except BackendUnavailable as exc:
            if options.backends:  # asked for by name: say so
                raise
            log.info("leaving out %s", exc)
            continue
        out.append(backend)
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:400]
    return text if isinstance(exc, LipverifyError) else f"{type(exc).__name__}: {text}"


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux/glibc: the deadline kill still applies
        log.debug("cannot ask to die with the parent process")


def _serve(conn: Connection, options: BackendOptions) -> None:
    """The child: load, report ready, then answer certify requests until told to stop."""
    _die_with_parent()
    logging.basicConfig(level=options.log_level, format="%(levelname)s %(name)s: %(message)s")
    if options.log_level > logging.DEBUG:  # backends' library deprecations are noise here
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        local = LocalBackends(options)
        conn.send(("ready", local.summaries))
    except (BrokenPipeError, ConnectionResetError):
        return  # the parent is gone (out of time while this child loaded)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        try:
            conn.send(("error", _one_line(exc)))
        except OSError:
            pass
        return
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            conn.send(("ok", local.certify(*request)))
        except (BrokenPipeError, ConnectionResetError):
            return
        except BaseException as exc:  # noqa: BLE001 - one backend failing is not fatal
            conn.send(("error", _one_line(exc)))


def warm_up() -> None:
    """Start the fork server now (it imports `PRELOAD` while the caller does other work)."""
    ctx = multiprocessing.get_context("forkserver")
    # The stdlib's fork server is one per process; preloading only speeds its children.
    backends = sorted({ep.value.split(":")[0] for ep in
                       importlib.metadata.entry_points(group="lipverify.backends")})
    ctx.set_forkserver_preload([*PRELOAD, *backends])
    multiprocessing.forkserver.ensure_running()


def stop_fork_server() -> None:
    """Kill this process's fork server, for a process about to exit at once (`os._exit`).

    A fork server still importing `PRELOAD` notices its parent's exit only when the imports end,
    seconds later, and holds the caller's stdout and stderr open until then. (Not reaped here:
    the stdlib's `ensure_running` reaps a dead server and starts a new one when asked.)
    """
    pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class WorkerBackends:
    """The network and backends in a child process; same interface as `LocalBackends`.

    Starting a fork-server child blocks until the server has imported `PRELOAD` (several seconds
    on a loaded machine), so the start runs in a thread: the deadline, not the import, bounds
    the wait, and a child that starts after `close` is killed as it comes.
    """

    def __init__(self, options: BackendOptions) -> None:
        warm_up()
        ctx = multiprocessing.get_context("forkserver")
        self.conn, self._child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(self._child, options), daemon=True,
                                name=f"lipverify-{Path(options.onnx_path).stem}")
        self.summaries: list[BackendSummary] = []
        self._lock = threading.Lock()
        self._started = False  # proc.start() returned (or failed)
        self._closed = False
        self._starter = threading.Thread(target=self._start, daemon=True,
                                         name="lipverify-worker-start")
        self._starter.start()

    def _start(self) -> None:
        try:
            self.proc.start()
        except Exception:  # noqa: BLE001 - the parent sees a dead child and reports it
            log.debug("cannot start the backend process", exc_info=True)
        finally:
            self._child.close()
            with self._lock:
                self._started, late = True, self._closed
            if late:
                self._stop()

    def _receive(self, deadline: float) -> tuple[str, Any] | None:
        """The child's next message, or None when the deadline passed (the child is killed)."""
        self._starter.join(max(deadline - time.monotonic(), 0.0))
        if self._starter.is_alive() or not self.conn.poll(max(deadline - time.monotonic(), 0.0)):
            self.kill()
            return None
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            if self.proc.pid is not None:
                self.proc.join(1.0)
            return ("error", f"backend process died (exit code {self.proc.exitcode})")

    def wait_ready(self, deadline: float) -> list[BackendSummary]:
        """Block until the child loaded the network (raises `OutOfTime` or `WorkerError`)."""
        message = self._receive(deadline)
        if message is None:
            raise OutOfTime("the deadline passed while loading the network")
        kind, payload = message
        if kind != "ready":
            raise WorkerError(payload)
        self.summaries = payload
        return payload

    def certify(self, name: str, case: SpecCase, deadline: float,
                overrides: Mapping[str, Any] | None = None) -> tuple[Certificate, str | None]:
        """Backend `name` on one box; `timeout` when the child had to be killed."""
        if not self.proc.is_alive():
            return Certificate(Status.ERROR, name, details={"error": "backend process gone"}), \
                None
        self.conn.send((name, case, deadline, dict(overrides or {})))
        message = self._receive(deadline)
        if message is None:
            return Certificate(Status.TIMEOUT, name), None
        kind, payload = message
        if kind == "ok":
            return payload
        return Certificate(Status.ERROR, name, details={"error": payload}), None

    def _stop(self) -> None:
        """Kill the child if it was started (it may not be, or still be starting)."""
        if self.proc.pid is None:
            return
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()

    def kill(self) -> None:
        """Stop the child now; one still starting is killed by the starter when it comes."""
        with self._lock:
            self._closed = True
            started = self._started
        if started:
            self._stop()

    def close(self) -> None:
        """Ask the child to stop (kill it if it does not, or if it is still loading)."""
        if self.summaries and self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(2.0)
        self.kill()
        self.conn.close()
