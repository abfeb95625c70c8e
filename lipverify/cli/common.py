"""Argument helpers shared by subcommands: model, data, device, backends."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from lipverify.backends.base import Verifier
from lipverify.backends.registry import BackendRegistry
from lipverify.errors import InputError
from lipverify.models import ARCHITECTURES, INPUT_SHAPE, load_shipped
from lipverify.network.network import Network

DEFAULT_MODEL = "digits_mlp"


def add_model_args(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    """--model (or MODEL), --arch, --input-shape, --trust-pickle, --device."""
    help_model = (f"Model: a shipped name ({', '.join(ARCHITECTURES)}), a .onnx file, or a .pt "
                  "file (state dict with --arch, or TorchScript).")
    if positional:
        parser.add_argument("model", help=help_model)
    else:
        parser.add_argument("--model", default=DEFAULT_MODEL, help=help_model +
                            f" Default: {DEFAULT_MODEL}.")
    parser.add_argument("--arch", default=None,
                        help="Architecture of a state-dict .pt: a shipped name or "
                             "'package.module:function'.")
    parser.add_argument("--input-shape", default=None,
                        help="Input shape without batch, e.g. 1,28,28 (when it can't be read "
                             "from the model).")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="Allow loading arbitrary pickled models (runs code from the file: "
                             "only for files you trust).")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="Where to compute (auto: CUDA when available).")


def resolve_device(name: str) -> torch.device:
    """`auto` becomes CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda requested but CUDA is not available")
    return torch.device(name)


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(s) for s in text.replace("x", ",").split(",") if s)
    except ValueError as exc:
        raise InputError(f"bad --input-shape {text!r}: use e.g. 1,28,28") from exc


def load_model(args: argparse.Namespace, attr: str = "model") -> Network:
    """The network named by the arguments (shipped name or file)."""
    from lipverify.network.load import load_network

    spec = getattr(args, attr)
    device = resolve_device(args.device)
    if spec in ARCHITECTURES:
        return load_network(load_shipped(spec), INPUT_SHAPE, device=device, name=spec)
    return load_network(spec, _shape(args.input_shape), arch=args.arch,
                        trust_pickle=args.trust_pickle, device=device)


def registry(args: argparse.Namespace) -> BackendRegistry:
    """The backend registry with --disable-backend applied."""
    return BackendRegistry.from_entry_points(disabled=getattr(args, "disable_backend", []))


def select_backends(args: argparse.Namespace, names: str | Sequence[str] | None,
                    default: Sequence[str]) -> list[Verifier]:
    """Backends by comma-separated names (or `all`: every available one), cheapest first."""
    reg = registry(args)
    if names is None:
        wanted = list(default)
    elif isinstance(names, str):
        wanted = [n.strip() for n in names.split(",") if n.strip()]
    else:
        wanted = list(names)
    if wanted == ["all"]:
        wanted = [name for name, _, why in reg.status() if why is None]
    if not wanted:
        raise InputError("no backend selected")
    return reg.create_many(wanted)
