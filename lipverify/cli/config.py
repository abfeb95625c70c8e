"""`lipverify config`: print the commented default configuration, or validate a file."""

from __future__ import annotations

import argparse
import dataclasses

from lipverify.cli.common import registry
from lipverify.config import defaults_yaml, load_config


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("config", help="Print the default config or validate a config file.",
                       description="With --defaults, print a commented default YAML run "
                                   "configuration (every backend's options included). With a "
                                   "FILE, validate it: an unknown key is an error naming it.")
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


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    if args.file:
        config = load_config(args.file)
        schemas = _schemas(args)
        from lipverify.config import backend_options

        for name, opts in config.backends.items():
            if name not in schemas:
                registry(args).entry(name)  # raises naming the unknown backend
            backend_options(name, schemas[name], opts)
        print(f"{args.file}: valid ({len(dataclasses.fields(config))} keys checked)")
        return 0
    print(defaults_yaml(_schemas(args)), end="")
    return 0
