"""Write a comparison: Markdown summary, per-input CSV and PNG plots (matplotlib, no screen)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lipverify.comparison.collect import Comparison


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(cmp: Comparison) -> str:
    """The summary table (per backend: bounds, ratio to the lower bound, certified accuracy...)."""
    eps_cols = " | ".join(f"cert. acc. @ {e:g}" for e in cmp.eps_grid)
    lines = [f"# lipverify compare (L{cmp.norm.value})", "",
             f"Lower bound on the Lipschitz constant: **{cmp.lower_bound:.4g}** "
             f"({cmp.lower_method})."]
    if cmp.pairwise_lower_max is not None:
        lines.append(f"Largest pairwise lower bound (gradient of f_y - f_j): "
                     f"{cmp.pairwise_lower_max:.4g}.")
    if cmp.bilipschitz_lower is not None:
        lines.append(f"Smallest distance ratio found, ||f(x) - f(x')|| / ||x - x'|| = "
                     f"{cmp.bilipschitz_lower:.4g} (a lower bi-Lipschitz *estimate*, not a "
                     "bound).")
    lines += ["", f"| backend | global bound | / lower | max pairwise bound | {eps_cols} | "
                  "median radius | seconds |",
              "|---" * (6 + len(cmp.eps_grid)) + "|"]
    rows = [(r.name, r.global_bound, r.pairwise_max, r.radii, r.seconds) for r in cmp.backends]
    rows.append(("best", None, None, cmp.best_radii, sum(r.seconds for r in cmp.backends)))
    for name, g, pw, radii, secs in rows:
        ratio = None if g is None or cmp.lower_bound <= 0 else g / cmp.lower_bound
        accs = " | ".join(f"{cmp.certified_fraction(radii, e):.1%}" for e in cmp.eps_grid)
        lines.append(f"| {name} | {_fmt(g)} | {_fmt(ratio, '.3f')} | {_fmt(pw)} | {accs} | "
                     f"{np.median(radii):.4g} | {secs:.2f} |")
    skipped = [r for r in cmp.backends if r.skipped]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{r.name}: {r.skipped}" for r in skipped)]
    return "\n".join(lines) + "\n"


def write_csv(cmp: Comparison, path: Path) -> None:
    """One row per input: label, prediction, each backend's radius and the best."""
    names = [r.name for r in cmp.backends]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "label", "predicted", *names, "best"])
        for i in range(len(cmp.labels)):
            w.writerow([i, int(cmp.labels[i]), int(cmp.predicted[i]),
                        *[f"{r.radii[i]:.9g}" for r in cmp.backends], f"{cmp.best_radii[i]:.9g}"])


def plots(cmp: Comparison, out: Path) -> list[Path]:
    """Certified accuracy vs eps, radius per input, upper bounds vs the lower bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    grid = np.linspace(0, max(cmp.eps_grid) * 1.5, 60)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in cmp.backends:
        ax.plot(grid, [cmp.certified_fraction(r.radii, e) for e in grid], label=r.name)
    ax.plot(grid, [cmp.certified_fraction(cmp.best_radii, e) for e in grid], "k--", lw=2,
            label="best")
    ax.set(xlabel=f"eps (L{cmp.norm.value})", ylabel="certified accuracy",
           title="Certified accuracy against eps")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(out / "certified_accuracy.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    order = np.argsort(cmp.best_radii)
    for r in cmp.backends:
        ax.plot(np.arange(len(order)), r.radii[order], ".", ms=4, label=r.name)
    ax.plot(np.arange(len(order)), cmp.best_radii[order], "k-", lw=1, label="best")
    ax.set(xlabel="input (sorted by best radius)", ylabel="certified radius",
           title="Certified radius per input")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(out / "radius_per_input.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    named = [r for r in cmp.backends if r.global_bound is not None]
    names = [r.name for r in named] + ["lower bound"]
    values = [r.global_bound for r in named] + [cmp.lower_bound]
    colors = ["tab:blue"] * len(named) + ["tab:green"]
    ax.bar(names, values, color=colors)
    for k, v in enumerate(values):
        ratio = v / cmp.lower_bound if cmp.lower_bound > 0 else float("nan")
        ax.text(k, v, f"{v:.3g}\n(x{ratio:.2f})", ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="global Lipschitz constant", title="Upper bounds against the lower bound")
    ax.set_ylim(0, max(values) * 1.25 if values else 1)
    paths.append(out / "bounds_vs_lower.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(cmp: Comparison, out: Path) -> dict[str, Path]:
    """Write summary.md, radii.csv and the plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(markdown(cmp))
    write_csv(cmp, out / "radii.csv")
    files = {"summary": out / "summary.md", "csv": out / "radii.csv"}
    for p in plots(cmp, out):
        files[p.stem] = p
    return files
