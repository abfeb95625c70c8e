"""Compatibility patches that let auto_LiRPA 0.3 run on torch 2.x and NumPy 2.

auto_LiRPA 0.3 (the only release on PyPI) was written for torch < 1.13 and NumPy 1. Four small
gaps stop it on current versions; each patch below restores exactly the old behaviour:

- `torch.onnx.symbolic_helper._set_opset_version` is gone: the opset now lives on the ONNX
  exporter's `GLOBALS`, so the patch sets it there.
- `torch._C.Node.__getitem__` is gone: `node[name]` dispatched on the attribute's kind, which
  `node.kindOf(name)` still reports (`node.i(name)`, `node.f(name)`, ...).
- `numpy.lib.arraysetops` is gone: auto_LiRPA only imports `isin` from it.
- `nn.Module._named_members` gained a `remove_duplicate` argument that `BoundedModule`'s override
  does not accept (hit by `named_parameters()` on some convnets).

Importing auto_LiRPA also has process-wide side effects that `load_auto_lirpa` undoes: it adds a
stdout handler to the root logger and resets the warning filters.

Patches are applied only when needed and at most once (each checks before it changes anything).
`lirpa_extensions` adds two small subclasses that give auto_LiRPA 0.3 balls with one radius per
input. Only this module and `lipverify.backends._lirpa_adapter` touch auto_LiRPA.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from lipverify.errors import BackendUnavailable

log = logging.getLogger(__name__)

MODULE = "auto_LiRPA"
LIRPA_LOGGER = "auto_LiRPA.utils"
# The opset auto_LiRPA 0.3 traces with.
LIRPA_OPSET = 12
_GLOBALS_MODULES = ("torch.onnx._internal.torchscript_exporter._globals", "torch.onnx._globals")


def _onnx_globals() -> Any:
    """Torch's ONNX exporter `GLOBALS` object (its module moved between torch versions)."""
    for name in _GLOBALS_MODULES:
        try:
            return importlib.import_module(name).GLOBALS
        except (ImportError, AttributeError):
            continue
    raise BackendUnavailable("cannot find torch's ONNX exporter GLOBALS to set the opset")


def _patch_opset() -> bool:
    import torch.onnx.symbolic_helper as helper

    if hasattr(helper, "_set_opset_version"):
        return False
    onnx_globals = _onnx_globals()

    def _set_opset_version(opset_version: int) -> None:
        onnx_globals.export_onnx_opset_version = opset_version

    helper._set_opset_version = _set_opset_version
    return True


def _node_getitem(node: Any, key: str) -> Any:
    """`node[key]`: the attribute read through the accessor its kind names (`i`, `fs`, ...)."""
    return getattr(node, node.kindOf(key))(key)


def _patch_node_getitem() -> bool:
    import torch

    if hasattr(torch._C.Node, "__getitem__"):
        return False
    torch._C.Node.__getitem__ = _node_getitem
    return True


def _patch_arraysetops() -> bool:
    import numpy as np

    if "numpy.lib.arraysetops" in sys.modules:
        return False
    try:
        importlib.import_module("numpy.lib.arraysetops")
        return False
    except ImportError:
        pass
    shim = types.ModuleType("numpy.lib.arraysetops")
    shim.isin = np.isin
    sys.modules["numpy.lib.arraysetops"] = shim
    return True


def _patch_named_members(lirpa: types.ModuleType) -> bool:
    cls = lirpa.BoundedModule
    original: Callable[..., Any] = cls._named_members
    if getattr(original, "_lipverify_patched", False):
        return False

    def _named_members(self: Any, get_members_fn: Callable[..., Any], prefix: str = "",
                       recurse: bool = True, remove_duplicate: bool = True) -> Any:
        # BoundedModule always removes duplicates (its memo); the flag only needs accepting.
        return original(self, get_members_fn, prefix, recurse)

    _named_members._lipverify_patched = True  # type: ignore[attr-defined]
    cls._named_members = _named_members
    return True


def load_auto_lirpa() -> types.ModuleType:
    """Import auto_LiRPA with the compatibility patches applied (idempotent).

    Raises:
        BackendUnavailable: auto_LiRPA is not installed, or a patch or the import failed.
    """
    if importlib.util.find_spec(MODULE) is None:
        raise BackendUnavailable("auto_LiRPA is not installed (pip install --no-deps "
                                 "auto-lirpa==0.3)")
    applied = []
    try:
        for name, patch in (("opset", _patch_opset), ("node_getitem", _patch_node_getitem),
                            ("arraysetops", _patch_arraysetops)):
            if patch():
                applied.append(name)
        # auto_LiRPA's import resets the process's warning filters and its `torch.jit.script`
        # decorators warn; record both inside the block (restored on exit) and log them.
        # Its utils also call `logging.basicConfig(stream=sys.stdout)`: undo that on the root.
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        with warnings.catch_warnings(record=True) as caught:
            try:
                lirpa = importlib.import_module(MODULE)
            finally:
                root.handlers[:] = handlers
                root.setLevel(level)
        for warning in caught:
            log.debug("while importing auto_LiRPA: %s", warning.message)
        if _patch_named_members(lirpa):
            applied.append("named_members")
    except BackendUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means the backend cannot run here
        raise BackendUnavailable(f"auto_LiRPA cannot be loaded here: {type(exc).__name__}: "
                                 f"{exc}") from exc
    if applied:
        log.debug("auto_LiRPA compatibility patches applied: %s", ", ".join(applied))
    return lirpa


def lirpa_availability() -> str | None:
    """None when auto_LiRPA loads (patched), else why not."""
    try:
        load_auto_lirpa()
    except BackendUnavailable as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def quiet_lirpa() -> Iterator[None]:
    """Silence auto_LiRPA's own logger (it logs errors for every operation it cannot bound
    while lipverify is only probing whether it can)."""
    logger = logging.getLogger(LIRPA_LOGGER)
    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before


@functools.cache
def lirpa_extensions() -> types.SimpleNamespace:
    """auto_LiRPA subclasses for balls whose radius differs per input (built once, immutable).

    Returns a namespace with `lirpa` (the patched module), `PerInputLpNorm` and `Bounded`.
    """
    lirpa = load_auto_lirpa()
    from auto_LiRPA.bound_ops import BoundConv, BoundInput
    from auto_LiRPA.patches import Patches
    from auto_LiRPA.utils import eyeC

    class PerInputLpNorm(lirpa.PerturbationLpNorm):
        """An Lp ball with one radius per input: `eps` shaped `(B, 1)`.

        auto_LiRPA multiplies `eps` into dual norms shaped `(B, rows)`, which broadcasts; only
        the identity cases add `eps` to the input itself and need it reshaped.
        """

        def concretize(self, x: Any, A: Any, sign: int = -1, aux: Any = None,
                       extra_constr: Any = None) -> Any:
            if isinstance(A, eyeC):
                return x.reshape(x.shape[0], -1) + sign * self.eps
            if isinstance(A, Patches) and A.identity:
                return x + sign * self.eps.view(-1, *([1] * (x.dim() - 1)))
            return super().concretize(x, A, sign, aux, extra_constr)

    class Bounded(lirpa.BoundedModule):
        """`BoundedModule` that bounds a first convolution by CROWN under per-input radii.

        auto_LiRPA's shortcut bounds the first convolution by interval arithmetic with a scalar
        radius; back-substitution gives the same (or tighter) bound and accepts any radius.
        """

        def check_IBP_first_linear(self, node: Any) -> bool:  # noqa: N802 - auto_LiRPA's name
            first = node.inputs[0] if getattr(node, "inputs", None) else None
            if (isinstance(node, BoundConv) and isinstance(first, BoundInput)
                    and isinstance(getattr(first, "perturbation", None), PerInputLpNorm)):
                return False
            return super().check_IBP_first_linear(node)

    return types.SimpleNamespace(lirpa=lirpa, PerInputLpNorm=PerInputLpNorm, Bounded=Bounded)
