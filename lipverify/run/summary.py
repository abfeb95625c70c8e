"""Summaries of certification records: clean accuracy and certified counts per eps and backend."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lipverify.run.records import eps_key


def summarise(records: Iterable[Mapping[str, Any]], eps_values: Sequence[float],
              backends: Sequence[str]) -> dict[str, Any]:
    """`n`, `clean_accuracy` and `certified[eps][backend]` (with `best`) from records."""
    records = list(records)
    keys = [eps_key(e) for e in eps_values]
    indices = {r["index"]: r for r in records}
    n = len(indices)
    correct = sum(1 for r in indices.values() if r["predicted"] == r["label"])
    certified: dict[str, dict[str, int]] = {k: {b: 0 for b in backends} | {"best": 0}
                                             for k in keys}
    falsified: dict[str, int] = {k: 0 for k in keys}
    for r in records:
        key = r["eps_key"]
        if key not in certified:
            continue
        if r["status"] == "verified":
            certified[key]["best"] += 1
        if r["status"] == "falsified":
            falsified[key] += 1
        for name, res in r.get("per_backend", {}).items():
            if res.get("status") == "verified":
                certified[key][name] = certified[key].get(name, 0) + 1
    return {"n": n, "clean_accuracy": correct / n if n else 0.0, "certified": certified,
            "falsified": falsified, "eps": {k: float(e) for k, e in zip(keys, eps_values,
                                                                        strict=True)}}


def format_table(summary: Mapping[str, Any], backends: Sequence[str], norm: str,
                 mode: str = "budget") -> str:
    """A plain-text table: certified accuracy per eps (rows) and backend (columns).

    The footer says what the columns count: in budget mode a backend sees only the inputs the
    cheaper ones left open, so its column is its marginal share, not what it proves alone.
    """
    n = summary["n"] or 1
    cols = [b for b in backends if b != "attack"] + ["best"]
    head = (f"{'eps (L' + norm + ')':>12} | " + " | ".join(f"{c:>11}" for c in cols)
            + f" | {'falsified':>11}")
    lines = [f"n = {summary['n']}, clean accuracy = {summary['clean_accuracy']:.1%}", head,
             "-" * len(head)]
    for key, counts in summary["certified"].items():
        eps = summary["eps"][key]
        cells = [f"{counts.get(c, 0) / n:>10.1%} " for c in cols]
        cells.append(f"{summary['falsified'].get(key, 0) / n:>10.1%} ")
        lines.append(f"{eps:>12g} | " + " | ".join(cells))
    if mode == "budget":
        lines.append("(budget mode, backends cheapest first: a backend's column counts the inputs "
                     "it certified among those the cheaper ones left open, not what it proves "
                     "alone; 'best' keeps each input's strongest certificate; --mode radius or "
                     "`lipverify compare` runs every backend on every input)")
    else:
        lines.append("(radius mode: every backend ran on every input not falsified; 'best' keeps "
                     "each input's largest certified radius)")
    return "\n".join(lines)
