"""`lipverify config`: print the commented default configuration, or validate a file.

A file with a top-level `instances` key is a VNN-COMP batch config (`lipverify vnncomp
--config`), any other a run config; both have their backend options checked against each
backend's `Options`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lipverify.backends.registry import BackendRegistry
from lipverify.cli.common import registry
from lipverify.config import VnncompConfig, check_backend_options, defaults_yaml, load_any_config
from lipverify.errors import InputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("config", help="Print the default config or validate a config file.",
                       description="With --defaults, print a commented default YAML run "
                                   "configuration (every backend's options included). With a "
                                   "FILE, validate it (a run config, or a VNN-COMP batch "
                                   "config when it has an 'instances' key): an unknown key is "
                                   "an error naming it.")
    p.add_argument("file", nargs="?", help="A YAML config to validate.")
    p.add_argument("--defaults", action="store_true", help="Print the commented defaults.")
    p.set_defaults(run=run)


def _schemas(args: argparse.Namespace) -> dict[str, type]:
    schemas = {}
    reg = registry(args)
    for name in reg.names:
        try:
            schemas[name] = reg.entry(name).load().Options
        except Exception:  # noqa: BLE001 - an unavailable backend has no schema to show
            continue
    return schemas


def _check_vnncomp(args: argparse.Namespace, config: VnncompConfig) -> None:
    """Check that the instances file exists and that the backends and their options are known."""
    reg = BackendRegistry.from_entry_points(
        disabled=[*(getattr(args, "disable_backend", []) or []), *config.disable])
    check_backend_options(config.backends, reg.load)
    if not Path(config.instances).is_file():
        raise InputError(f"{args.file}: instances file not found: {config.instances}")


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    if args.file:
        config = load_any_config(args.file)
        if isinstance(config, VnncompConfig):
            _check_vnncomp(args, config)
        else:
            check_backend_options(config.backends, registry(args).load)
        print(f"{args.file}: valid ({len(dataclasses.fields(config))} keys checked)")
        return 0
    print(defaults_yaml(_schemas(args)), end="")
    return 0
