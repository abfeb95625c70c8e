"""`lipverify` command line: one module per subcommand, each with `add_parser` and `run`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from lipverify.errors import LipverifyError

# Each name is a module `lipverify.cli.<name>` exposing `add_parser(subparsers)` and `run(args)`.
SUBCOMMANDS = ("certify", "lipschitz", "compare", "backends", "config", "vnncomp")

DESCRIPTION = """\
lipverify proves neural networks robust: per input a sound certificate (verified with a
certified radius, falsified with a checked counterexample, or unknown).

Backends (see `lipverify backends`): spectral (global Lipschitz product), lirpa / alpha-crown
(linear relaxation through auto_LiRPA), local (local Lipschitz on unstable neurons), lipsdp
(LipSDP through cvxpy), l2prop (L2-aware bound propagation), attack (PGD falsifier).
"""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(prog="lipverify", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="Show full tracebacks and debug logging.")
    parser.add_argument("--disable-backend", action="append", default=[], metavar="NAME",
                        help="Leave backend NAME out of the registry (repeatable).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"lipverify.cli.{name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command line; returns the exit code (what tests and embedding code call)."""
    return _dispatch(argv)[0]


def console() -> None:
    """Entry point of the console script: `main`, then exit.

    A command that sets `args.fast_exit` (a VNN-COMP instance, whose result file is written and
    whose clock includes process exit) ends without the interpreter's teardown of torch and
    onnxruntime, which takes a second or more on a loaded machine. A callable `fast_exit` is
    called first (it stops helper processes that would hold the caller's pipes open).
    """
    code, args = _dispatch(None)
    fast_exit = getattr(args, "fast_exit", False)
    if fast_exit:
        if callable(fast_exit):
            fast_exit()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _dispatch(argv: Sequence[str] | None) -> tuple[int, argparse.Namespace | None]:
    parser = build_parser()
    args = parser.parse_args(argv)
    return _run(parser, args), args


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("lipverify: interrupted", file=sys.stderr)
        return 130
    except LipverifyError as exc:
        if args.debug:
            raise
        print(f"lipverify: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line for users, the traceback with --debug
        if args.debug:
            raise
        print(f"lipverify: error: {type(exc).__name__}: {exc} (run with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    console()
