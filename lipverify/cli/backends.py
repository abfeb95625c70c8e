"""`lipverify backends`: the registered backends, whether each is usable here, and why not."""

from __future__ import annotations

import argparse
import json

from lipverify.cli.common import registry


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("backends", help="List backends and whether each can run here.",
                       description="List the backends registered under the 'lipverify.backends' "
                                   "entry points, the distribution providing each, and why a "
                                   "backend is unavailable.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    rows = []
    reg = registry(args)
    for name, dist, why in reg.status():
        info = {"name": name, "distribution": dist, "available": why is None, "why": why}
        try:
            cls = reg.entry(name).load()
            info.update(cost=cls.cost, sound=cls.sound,
                        norms=sorted(n.value for n in cls.norms))
        except Exception:  # noqa: BLE001 - an unloadable backend is reported, not fatal
            pass
        rows.append(info)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'backend':<12} {'cost':>4}  {'norms':<8} {'status':<11} provided by")
    for r in sorted(rows, key=lambda r: (r.get("cost", 999), r["name"])):
        status = "available" if r["available"] else "unavailable"
        norms = ",".join(r.get("norms", [])) or "-"
        line = f"{r['name']:<12} {r.get('cost', '-'):>4}  {norms:<8} {status:<11} " \
               f"{r['distribution']}"
        if r["why"]:
            line += f"\n{'':<14}why: {r['why']}"
        print(line)
    return 0
