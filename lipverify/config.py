"""Run configurations: one schema (frozen dataclasses) that validates YAML, takes `--set`
overrides and prints a commented default file.

Each backend brings its own `Options` dataclass, validated under `backends.<name>`, so plug-ins
bring their configuration schema with them. An unknown key is an error naming the dotted key.
A VNN-COMP batch config (`VnncompConfig`, told apart by its top-level `instances` key) uses the
same reading and validation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lipverify.errors import InputError


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - 'help' mirrors argparse
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help},
                     **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class RunConfig:
    """What to verify and how: the schema of a YAML run configuration."""

    model: str = _f("digits_mlp", "Model: a shipped name, a .onnx file or a .pt file.")
    arch: str | None = _f(None, "Architecture of a state-dict .pt (shipped name or module:fn).")
    input_shape: list[int] | None = _f(None, "Input shape without batch, when not in the model.")
    data: str = _f("digits", "Data: 'digits' or a .npz file with arrays x and y.")
    limit: int | None = _f(None, "Use only the first N inputs.")
    norm: str = _f("2", "Perturbation norm: '2' or 'inf'.")
    eps: list[float] = _f([0.1, 0.3, 0.5], "Radii to certify at.")
    mode: str = _f("budget", "Cascade mode: 'budget' (stop when resolved) or 'radius'.")
    backends: dict[str, dict[str, Any]] = _f(
        {"attack": {}, "spectral": {}, "lirpa": {}, "local": {}, "l2prop": {},
         "alpha-crown": {}, "lipsdp": {}},
        "Backends to run (cheapest first) with their options.")
    device: str = _f("auto", "Device: 'auto', 'cpu' or 'cuda'.")
    seed: int = _f(0, "Random seed for attacks and sampling.")
    batch_size: int = _f(256, "Inputs per cascade batch.")
    time_budget: float | None = _f(10.0, "Seconds per input, pooled over the run (a batch may "
                                         "use what earlier ones left); none: no limit.")
    time_total: float | None = _f(None, "Seconds for the whole run; none: no limit.")
    out: str | None = _f(None, "JSONL file of per-input records.")
    trust_pickle: bool = _f(False, "Allow arbitrary pickled models (runs code from the file).")


def _required(help: str) -> Any:  # noqa: A002 - 'help' mirrors argparse
    return field(metadata={"help": help})


@dataclass(frozen=True)
class VnncompConfig:
    """A VNN-COMP batch: the schema of a YAML config with a top-level `instances` key.

    Relative paths are resolved against the config file's folder (`load_vnncomp_config`).
    """

    instances: str = _required("The competition's instances.csv (onnx,vnnlib,timeout rows).")
    results: str = _required("Results CSV, appended to (rows already there are skipped).")
    result_dir: str | None = _f(None, "Also write each instance's result file here.")
    category: str | None = _f(None, "First results column (default: the benchmark's folder).")
    timeout: float | None = _f(None, "Cap in seconds on each instance's own timeout.")
    backends: dict[str, dict[str, Any]] = _f(
        {}, "Backends to use with their options; empty: every available backend.")
    disable: list[str] = _f([], "Backends to leave out.")
    isolate: bool = _f(True, "Run backends in a child process killed at the deadline.")
    device: str = _f("cpu", "Torch device for the network: 'cpu' or 'cuda'.")

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise InputError(f"config key 'timeout' must be positive, got {self.timeout}")
        if self.device not in ("cpu", "cuda"):
            raise InputError(f"config key 'device' must be 'cpu' or 'cuda', got {self.device!r}")


def _type_ok(value: Any, annotation: Any) -> bool:
    """A light type check of YAML values against a dataclass field annotation."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Any": Any, "Path": Path})  # noqa: S307 - our own source
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def build(schema: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass `schema` from a mapping; unknown keys and bad types are errors."""
    if not isinstance(data, Mapping):
        raise InputError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(schema)}
    for key in data:
        if key not in known:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise InputError(f"unknown config key {dotted!r}; known: {', '.join(known)}")
    for name, f in known.items():
        if name not in data and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            dotted = f"{prefix}.{name}" if prefix else name
            raise InputError(f"config key {dotted!r} is required")
    values = {}
    for key, value in data.items():
        f = known[key]
        if not _type_ok(value, f.type):
            dotted = f"{prefix}.{key}" if prefix else key
            raise InputError(f"config key {dotted!r}: {value!r} does not fit type {f.type}")
        values[key] = value
    return schema(**values)


def backend_options(name: str, options_cls: type, data: Mapping[str, Any] | None) -> Any:
    """A backend's `Options` from its section `backends.<name>`."""
    if not dataclasses.is_dataclass(options_cls):
        if data:
            raise InputError(f"backend {name!r} takes no options")
        return None
    return build(options_cls, data or {}, f"backends.{name}")


def _read_yaml(path: str | Path) -> dict[str, Any]:
    """Read the top-level mapping of a YAML file (empty for an empty file); errors name the line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}{where}: malformed YAML ({getattr(exc, 'problem', exc)})") \
            from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _check_backend_sections(backends: Any) -> dict[str, dict[str, Any]]:
    """`backends` as a mapping of names to option mappings (`name:` alone means no options)."""
    if not isinstance(backends, dict):
        raise InputError("config key 'backends' must map backend names to options")
    for name, opts in backends.items():
        if opts is not None and not isinstance(opts, dict):
            raise InputError(f"config key 'backends.{name}' must be a mapping of options")
    return {name: dict(opts or {}) for name, opts in backends.items()}


def check_backend_options(backends: Mapping[str, Mapping[str, Any] | None],
                          load: Callable[[str], type]) -> None:
    """Validate each `backends.<name>` section against the `Options` of the class `load` gives."""
    for name, opts in backends.items():
        backend_options(name, getattr(load(name), "Options", None), opts)


def _run_config(data: Mapping[str, Any]) -> RunConfig:
    """Build a validated `RunConfig`."""
    config = build(RunConfig, data)
    _check_backend_sections(config.backends)
    return config


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run configuration."""
    return _run_config(_read_yaml(path))


def _resolve(folder: Path, value: str | None) -> str | None:
    """`value` as a path, a relative one taken from `folder`."""
    return None if value is None else str((folder / Path(str(value)).expanduser()).resolve())


def _vnncomp_config(data: Mapping[str, Any], folder: Path) -> VnncompConfig:
    """Build a validated `VnncompConfig`, its relative paths taken from `folder`."""
    config = build(VnncompConfig, data)
    return dataclasses.replace(
        config, instances=_resolve(folder, config.instances),
        results=_resolve(folder, config.results),
        result_dir=_resolve(folder, config.result_dir),
        backends=_check_backend_sections(config.backends))


def load_vnncomp_config(path: str | Path) -> VnncompConfig:
    """Read and validate a YAML VNN-COMP batch configuration.

    Relative paths in it (`instances`, `results`, `result_dir`) are resolved against the
    config file's folder, so the file means the same batch from any working directory.
    """
    return _vnncomp_config(_read_yaml(path), Path(path).resolve().parent)


def load_any_config(path: str | Path) -> RunConfig | VnncompConfig:
    """Load a run or a VNN-COMP config, told apart by a top-level `instances` key (VNN-COMP)."""
    data = _read_yaml(path)
    if "instances" in data:
        return _vnncomp_config(data, Path(path).resolve().parent)
    return _run_config(data)


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `key=value` / `backends.name.key=value` overrides (values parsed as YAML)."""
    data = dataclasses.asdict(config)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        parts = key.split(".")
        target = data
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise InputError(f"--set {key}: {part!r} is not a section")
        target[parts[-1]] = value
    return build(RunConfig, data)


def defaults_yaml(backend_schemas: Mapping[str, type] | None = None) -> str:
    """A commented default configuration (what `lipverify config --defaults` prints)."""
    lines = ["# lipverify run configuration (all keys optional; these are the defaults)."]
    default = RunConfig()
    for f in fields(RunConfig):
        lines.append(f"# {f.metadata['help']}")
        if f.name == "backends":
            lines.append("backends:")
            for name in getattr(default, "backends"):
                schema = (backend_schemas or {}).get(name)
                if schema is None or not dataclasses.is_dataclass(schema):
                    lines.append(f"  {name}: {{}}")
                    continue
                lines.append(f"  {name}:")
                for opt in fields(schema):
                    doc = opt.metadata.get("help")
                    if doc:
                        lines.append(f"    # {doc}")
                    value = opt.default if opt.default is not dataclasses.MISSING else (
                        opt.default_factory() if opt.default_factory is not dataclasses.MISSING
                        else None)
                    if hasattr(value, "value"):
                        value = value.value
                    if isinstance(value, (tuple, frozenset, set)):
                        value = list(value)
                    if not isinstance(value, (str, int, float, bool, list, dict, type(None))):
                        value = str(value)
                    lines.append("    " + yaml.safe_dump({opt.name: value},
                                                         default_flow_style=True).strip()[1:-1])
            continue
        dumped = yaml.safe_dump({f.name: getattr(default, f.name)}, default_flow_style=True)
        lines.append(dumped.strip()[1:-1])
    return "\n".join(lines) + "\n"
