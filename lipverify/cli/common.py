"""Argument helpers shared by subcommands: model, data, device, backends."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lipverify.backends.base import Verifier
from lipverify.backends.registry import BackendRegistry
from lipverify.config import backend_options
from lipverify.errors import InputError
from lipverify.models import ARCHITECTURES, INPUT_SHAPE, load_shipped
from lipverify.network.network import Network

DEFAULT_MODEL = "digits_mlp"


def add_model_args(parser: argparse.ArgumentParser, positional: bool = False,
                   model_optional: bool = False) -> None:
    """--model (or MODEL), --arch, --input-shape, --trust-pickle, --device.

    `model_optional` makes the positional MODEL optional (for a subcommand with another source).
    """
    help_model = (f"Model: a shipped name ({', '.join(ARCHITECTURES)}), a .onnx file, or a .pt "
                  "file (state dict with --arch, or TorchScript).")
    if positional:
        parser.add_argument("model", help=help_model, **({"nargs": "?"} if model_optional else {}))
    else:
        parser.add_argument("--model", default=None, help=help_model +
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


def load_model(config: Any, device: str = "auto") -> Network:
    """The network a run configuration names (shipped name or file)."""
    from lipverify.network.load import load_network

    dev = resolve_device(device)
    if config.model in ARCHITECTURES:
        return load_network(load_shipped(config.model), INPUT_SHAPE, device=dev,
                            name=config.model)
    shape = tuple(config.input_shape) if config.input_shape else None
    return load_network(config.model, shape, arch=config.arch,
                        trust_pickle=config.trust_pickle, device=dev)


def registry(args: argparse.Namespace) -> BackendRegistry:
    """The backend registry with --disable-backend applied."""
    return BackendRegistry.from_entry_points(disabled=getattr(args, "disable_backend", []))


def build_backends(args: argparse.Namespace, sections: Mapping[str, Any] | Sequence[str],
                   seed: int = 0) -> list[Verifier]:
    """Backends by name with their validated options (`all`: every available one)."""
    reg = registry(args)
    if isinstance(sections, str):
        sections = [n.strip() for n in sections.split(",") if n.strip()]
    if not isinstance(sections, Mapping):
        sections = {name: {} for name in sections}
    if list(sections) == ["all"]:
        sections = {name: {} for name, _, why in reg.status() if why is None}
    if not sections:
        raise InputError("no backend selected")
    backends = []
    for name, section in sections.items():
        cls = reg.entry(name).load()
        section = dict(section or {})
        options_cls = getattr(cls, "Options", None)
        if dataclasses.is_dataclass(options_cls) and "seed" in {
                f.name for f in dataclasses.fields(options_cls)}:
            section.setdefault("seed", seed)
        options = backend_options(name, options_cls, section)
        backends.append(cls(options) if options is not None else cls())
    return sorted(backends, key=lambda b: b.cost)
