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
Only this module and `lipverify.backends.lirpa` touch auto_LiRPA.
"""

from __future__ import annotations

import contextlib
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
