"""Import onnx2torch without a working torchvision.

onnx2torch imports torchvision only for its NonMaxSuppression and RoiAlign converters, ops no
verifier here can handle anyway. PyPI's torchvision wheels are built against one exact torch
version, so next to a different torch `import torchvision` fails (or half-imports). When it does,
a stub `torchvision` / `torchvision.ops` whose functions raise `NotImplementedError` stands in;
a working torchvision is never replaced.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any, NoReturn

log = logging.getLogger(__name__)

STUB_ATTRIBUTE = "__lipverify_stub__"
STUB_FUNCTIONS = ("nms", "batched_nms", "box_convert", "roi_align", "roi_pool")


def _unavailable(name: str) -> Any:
    def raise_unavailable(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(f"torchvision.ops.{name} is unavailable: torchvision does not "
                                  "import next to this torch")

    raise_unavailable.__name__ = name
    return raise_unavailable


def _stub_modules() -> tuple[types.ModuleType, types.ModuleType]:
    root = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    for name in STUB_FUNCTIONS:
        setattr(ops, name, _unavailable(name))
    root.ops = ops
    for module in (root, ops):
        setattr(module, STUB_ATTRIBUTE, True)
    root.__path__ = []  # a package, so `from torchvision.ops import x` resolves to the stub
    ops.__path__ = []
    return root, ops


def is_stub(module: types.ModuleType | None = None) -> bool:
    """True when `module` (default: the imported `torchvision`) is lipverify's stub."""
    module = module if module is not None else sys.modules.get("torchvision")
    return bool(getattr(module, STUB_ATTRIBUTE, False))


def ensure_torchvision() -> bool:
    """Make `import torchvision` succeed; True when the real package is in use."""
    if "torchvision" in sys.modules:
        return not is_stub(sys.modules["torchvision"])
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure (ImportError, RuntimeError) means stub
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]  # half-imported submodules must not shadow the stub
        root, ops = _stub_modules()
        sys.modules["torchvision"] = root
        sys.modules["torchvision.ops"] = ops
        log.debug("torchvision unavailable (%s): using a stub for onnx2torch", exc)
        return False
    return True


def import_onnx2torch() -> types.ModuleType:
    """`onnx2torch`, imported after making sure torchvision (or its stub) imports."""
    ensure_torchvision()
    import onnx2torch

    return onnx2torch
