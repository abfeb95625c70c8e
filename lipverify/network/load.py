"""Load a network from a torch module, a `.pt`/`.pth` file or an ONNX file.

`.pt`/`.pth` files load weights-only by default: a state dict with a named architecture, or
TorchScript. Full pickled modules can run arbitrary code while loading, so they load only with
`trust_pickle=True` (the CLI's `--trust-pickle`). Every network gets a layer view (or the name of
the layer that has none), checked against the module on random inputs: a view that does not
compute what the module computes is dropped, never used.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lipverify.errors import InputError, ModelError, UnsupportedLayerError
from lipverify.network.extract import extract_layers
from lipverify.network.fx_extract import PerSample, fx_layers
from lipverify.network.layers import Layer, Shape, run_layers
from lipverify.network.network import Network

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".ts")
# The layer view (float64) must match the module run in float64 to this relative tolerance, or
# in float32 (when the module cannot run in float64) to the looser one.
LAYER_RTOL_DOUBLE = 1e-9
LAYER_RTOL_FLOAT = 1e-4
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_PICKLE_REFUSED = ("{path} is a full pickled object; unpickling it can run arbitrary code. Pass "
                   "trust_pickle=True (--trust-pickle) only if you trust its source, or save a "
                   "state_dict (with --arch) or TorchScript instead")


def load_network(source: str | Path | nn.Module, input_shape: Shape | None = None, *,
                 arch: str | None = None, trust_pickle: bool = False,
                 device: str | torch.device | None = None, name: str | None = None) -> Network:
    """A `Network` from a module or a model file (`.onnx`, `.pt`, `.pth`, `.ts`).

    Args:
        source: an `nn.Module` or a path.
        input_shape: per-sample input shape (no batch dimension); read from ONNX graphs, from a
            module's `input_shape` attribute or from a leading `nn.Linear` when not given.
        arch: the architecture of a state dict: a name in `lipverify.models.ARCHITECTURES` or
            `package.module:function`.
        trust_pickle: allow full pickled modules (they can run arbitrary code).
        device: where the module runs (default CPU).
        name: a display name (default: the file stem or the class name).

    """
    if isinstance(source, nn.Module):
        module = source
        shape = input_shape if input_shape is not None else _infer_shape(module)
        label = name or type(module).__name__
    else:
        path = Path(source)
        label = name or path.stem
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            from lipverify.network.onnx_import import import_onnx

            imported = import_onnx(path, input_shape)
            module, shape = imported.module, imported.input_shape
        elif suffix in TORCH_SUFFIXES:
            module, inferred = _load_torch_file(path, arch, trust_pickle)
            shape = input_shape if input_shape is not None else inferred
            if shape is None:
                shape = _infer_shape(module)
        else:
            raise ModelError(f"{path}: unknown model format {suffix or '(no suffix)'}; expected "
                             f".onnx, {', '.join(TORCH_SUFFIXES)}")
    return build_network(module, tuple(int(s) for s in shape), device=device, name=label)


def build_network(module: nn.Module, input_shape: Shape, *,
                  device: str | torch.device | None = None, name: str = "network") -> Network:
    """Wrap a module: eval mode, finite weights, its output size and its checked layer view."""
    if not input_shape or any(s <= 0 for s in input_shape):
        raise InputError(f"input shape {tuple(input_shape)} must be non-empty and positive")
    module = module.eval().to("cpu")  # checked on the CPU, then moved to `device`
    _check_finite(module, name)
    try:
        with torch.no_grad():
            out = module(torch.zeros((1, *input_shape)))
    except Exception as exc:  # noqa: BLE001 - whatever the model raises on a wrong shape
        raise ModelError(f"{name} does not run on inputs of shape {tuple(input_shape)} "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{name} returns {type(out).__name__}, not one tensor")
    layers, unsupported = layer_view(module, input_shape)
    target = torch.device(device) if device is not None else torch.device("cpu")
    return Network(module.to(target), tuple(input_shape), int(out[0].numel()), layers,
                   unsupported, target, name)


def layer_view(module: nn.Module, input_shape: Shape) -> tuple[tuple[Layer, ...] | None,
                                                                 str | None]:
    """The module's checked layer view, or None and the reason (naming the layer)."""
    first: UnsupportedLayerError | None = None
    layers = None
    plain = _rebuild_script(module) if isinstance(module, torch.jit.ScriptModule) else module
    if plain is None:
        return None, (f"TorchScript {getattr(module, 'original_name', 'module')} (a layer view "
                      "needs a scripted Sequential of standard layers)")
    if not isinstance(plain, (torch.fx.GraphModule, PerSample)):
        try:
            layers = extract_layers(plain, input_shape)
        except UnsupportedLayerError as exc:
            first = exc
    if layers is None:
        try:
            layers = fx_layers(module, input_shape)
        except UnsupportedLayerError as exc:
            first = first or exc
            return None, first.layer
    why = _layer_mismatch(module, layers, input_shape)
    if why is not None:
        log.warning("layer view dropped: %s", why)
        return None, why
    return layers, None


_SCRIPT_REBUILD: dict[str, Callable[[Any], nn.Module]] = {
    "Linear": lambda m: nn.Linear(m.in_features, m.out_features, m.bias is not None),
    "Conv2d": lambda m: nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                                  m.padding, m.dilation, m.groups, m.bias is not None,
                                  m.padding_mode),
    "BatchNorm1d": lambda m: nn.BatchNorm1d(m.num_features, m.eps),
    "BatchNorm2d": lambda m: nn.BatchNorm2d(m.num_features, m.eps),
    "AvgPool2d": lambda m: nn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                        m.count_include_pad, m.divisor_override),
    "Flatten": lambda m: nn.Flatten(m.start_dim, m.end_dim),
    "LeakyReLU": lambda m: nn.LeakyReLU(m.negative_slope),
    "ReLU": lambda m: nn.ReLU(), "Tanh": lambda m: nn.Tanh(), "Sigmoid": lambda m: nn.Sigmoid(),
    "Identity": lambda m: nn.Identity(), "Dropout": lambda m: nn.Identity(),
}


def _rebuild_script(module: torch.jit.ScriptModule) -> nn.Module | None:
    """A TorchScript `Sequential` of standard modules as plain modules (None if it is not one).

    Only used to read the layer view, which is then checked against the TorchScript module.
    """
    kind = getattr(module, "original_name", "")
    try:
        if kind == "Sequential":
            parts = [_rebuild_script(child) for child in module.children()]
            return None if any(p is None for p in parts) else nn.Sequential(*parts)
        if kind not in _SCRIPT_REBUILD:
            return None
        plain = _SCRIPT_REBUILD[kind](module)
        plain.load_state_dict(module.state_dict())
    except Exception as exc:  # noqa: BLE001 - an attribute scripting did not keep
        log.debug("cannot rebuild TorchScript %s: %s", kind, exc)
        return None
    return plain.eval()


def _layer_mismatch(module: nn.Module, layers: tuple[Layer, ...], shape: Shape) -> str | None:
    """None when the layer view computes what the module computes on random inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand((2, *shape), generator=gen),
                   3 * torch.randn((2, *shape), generator=gen)]).double()
    with torch.no_grad():
        try:
            want = copy.deepcopy(module).double()(x)
            rtol = LAYER_RTOL_DOUBLE
        except Exception:  # noqa: BLE001 - modules that only run in float32
            want = module(x.float()).double()
            rtol = LAYER_RTOL_FLOAT
        try:
            got = run_layers(layers, x)
        except Exception as exc:  # noqa: BLE001
            return f"layer view fails to run ({type(exc).__name__}: {exc})"
    want, got = want.reshape(len(x), -1), got.reshape(len(x), -1)
    if want.shape != got.shape:
        return f"layer view outputs {got.shape[1]} values, the module {want.shape[1]}"
    err = float((want - got).abs().max())
    tol = rtol * (1.0 + float(want.abs().max()))
    if not err <= tol:
        return f"layer view differs from the module by {err:.3g} (tolerance {tol:.3g})"
    return None


def _check_finite(module: nn.Module, name: str) -> None:
    for key, value in [*module.named_parameters(), *module.named_buffers()]:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ModelError(f"{name}: weight {key} contains NaN or infinite values")


def _infer_shape(module: nn.Module) -> Shape:
    shape = getattr(module, "input_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    first = next((m for m in module.modules() if not list(m.children())), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    raise InputError(f"cannot infer the input shape of {type(module).__name__}: pass input_shape")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def _load_torch_file(path: Path, arch: str | None,
                     trust_pickle: bool) -> tuple[nn.Module, Shape | None]:
    """A module from a `.pt`/`.pth` file, and an input shape when the architecture knows one."""
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu"), None
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{path}: unreadable TorchScript ({type(exc).__name__})") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise ModelError(_PICKLE_REFUSED.format(path=path)) from exc
        log.warning("%s: unpickling a full object (trust_pickle)", path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001
            raise ModelError(f"{path}: cannot unpickle ({type(exc2).__name__})") from exc2
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file at all
        raise ModelError(f"{path}: not a readable torch file ({type(exc).__name__})") from exc
    if isinstance(obj, nn.Module):
        return obj, None
    if isinstance(obj, Mapping):
        return _from_state_dict(obj, arch, path)
    raise ModelError(f"{path} holds a {type(obj).__name__}, not a module or a state dict")


def _from_state_dict(obj: Mapping[str, Any], arch: str | None,
                     path: Path) -> tuple[nn.Module, Shape | None]:
    state = obj
    for key in _STATE_DICT_KEYS:
        if isinstance(obj.get(key), Mapping):
            state = obj[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: a dict that is not a state dict of tensors")
    if arch is None:
        from lipverify.models import ARCHITECTURES

        raise ModelError(f"{path} is a state dict: name its architecture with arch= (--arch): "
                         f"one of {', '.join(sorted(ARCHITECTURES))} or package.module:function")
    factory, shape = resolve_arch(arch)
    model = factory()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ModelError(f"{path}: weights do not fit architecture {arch} "
                         f"({' '.join(s.strip() for s in first[1:3]) or first[0]})") from exc
    shape = getattr(model, "input_shape", None) or shape
    return model, tuple(shape) if shape is not None else None


def resolve_arch(arch: str) -> tuple[Callable[[], nn.Module], Shape | None]:
    """The factory named `arch` and the input shape its module declares (`INPUT_SHAPE`)."""
    from lipverify import models

    if arch in models.ARCHITECTURES:
        return models.ARCHITECTURES[arch], models.INPUT_SHAPE
    if ":" not in arch:
        raise ModelError(f"unknown architecture {arch!r}: use one of "
                         f"{', '.join(sorted(models.ARCHITECTURES))} or package.module:function")
    module_name, _, attr = arch.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"cannot import architecture {arch} ({exc})") from exc
    if not callable(factory):
        raise ModelError(f"architecture {arch} is not callable")
    shape = getattr(factory, "input_shape", None) or getattr(module, "INPUT_SHAPE", None)
    return factory, tuple(shape) if shape is not None else None


def check_inputs(network: Network, x: np.ndarray | torch.Tensor) -> np.ndarray:
    """`x` as a float array shaped `(batch, *network.input_shape)`, or an `InputError`.

    Accepts each sample in the network's input shape or flattened.
    """
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    shape = tuple(network.input_shape)
    if arr.ndim < 1 or not (tuple(arr.shape[1:]) == shape or
                            (arr.ndim == 2 and arr.shape[1] == math.prod(shape))):
        raise InputError(f"inputs of shape {tuple(arr.shape[1:])} per sample do not fit the "
                         f"network's input shape {shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"inputs must be floating point, got {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise InputError("inputs contain NaN or infinite values")
    return arr.reshape((arr.shape[0], *shape))
