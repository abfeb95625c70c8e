"""L2 verified accuracy on the SDP-CROWN benchmark networks, per backend, beside the paper.

For each model of `configs/l2_sdpcrown.yaml` at the paper's radius, over the paper's 200 images
(`--limit N` for the first N): lipverify's verified % per backend (each backend run alone on
every correctly classified image), `best` (the orchestrator's budget-mode cascade over all of
them), the share an L2 PGD attack in the same run does not break (the ceiling), and seconds per
image; beside the paper's SDP-CROWN, alpha-CROWN, LipNaive, LipSDP and PGD columns.

    .venv/bin/python benchmarks/bench_l2.py [--limit 200] [--models mnist_mlp,...]
        [--backends attack,spectral,l2prop] [--out results.md]

Backends that are missing or refuse a model are reported as such. Verified counts only images
that are classified correctly (as the paper does). A verified image that PGD breaks would be a
soundness bug: the script stops with an error naming it.
"""

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from lipverify.backends.registry import BackendRegistry
from lipverify.errors import LipverifyError, SoundnessError
from lipverify.network.load import load_network
from lipverify.orchestrator import Mode, run_cascade
from lipverify.types import Perturbation, Problem, Status

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "l2_sdpcrown.yaml"
log = logging.getLogger("bench_l2")


def load_config(path):
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["data_dir"] = (path.parent.parent / cfg["data_dir"]).resolve()
    return cfg


def make_backend(registry, name, options):
    backend_cls = registry.load(name)
    opts = backend_cls.Options(**options.get(name, {})) if options.get(name) else None
    return backend_cls(opts) if opts is not None else backend_cls()


def run_model(cfg, name, backends, limit, registry):
    spec = cfg["models"][name]
    data = cfg["data_dir"]
    network = load_network(str(data / spec["onnx"]))
    images = np.load(data / f"{spec['data']}_images.npy")[:limit].astype(np.float64)
    labels = np.load(data / f"{spec['data']}_labels.npy")[:limit]
    n = len(images)
    correct = network.forward(images).argmax(1) == labels
    idx = np.flatnonzero(correct)
    problem = Problem.robustness(images[idx], labels[idx], network.num_outputs,
                                 Perturbation.ball(2, spec["eps"]))
    row = {"model": name, "eps": spec["eps"], "n": n, "clean": 100.0 * correct.mean()}
    instances = {}
    for b in backends:
        try:
            instances[b] = make_backend(registry, b, cfg.get("options", {}))
        except LipverifyError as exc:
            row[b] = f"n/a ({exc})"
    certs = {}
    for b, backend in instances.items():
        why = backend.supports(network, problem)
        if why is not None:
            row[b] = f"n/a ({why})"
            continue
        start = time.perf_counter()
        out = backend.certify(network, problem)
        seconds = time.perf_counter() - start
        certs[b] = out
        if b == "attack":
            broken = sum(c.status == Status.FALSIFIED for c in out)
            row["pgd"] = 100.0 * (len(idx) - broken) / n
            row["pgd_s"] = seconds / n
        else:
            row[b] = 100.0 * sum(c.status == Status.VERIFIED for c in out) / n
            row[f"{b}_s"] = seconds / n
        log.info("%s %s: %s in %.1fs", name, b, row.get(b, row.get("pgd")), seconds)
    if "attack" in certs:
        for b, out in certs.items():
            for i, (c, a) in enumerate(zip(out, certs["attack"], strict=True)):
                if c.status == Status.VERIFIED and a.status == Status.FALSIFIED:
                    raise SoundnessError(f"{name}: image {idx[i]} verified by {b} but PGD broke it")
    cascade = [instances[b] for b in certs]
    if cascade:
        start = time.perf_counter()
        outcome = run_cascade(network, problem, cascade, Mode.BUDGET)
        row["best"] = 100.0 * sum(c.status == Status.VERIFIED for c in outcome.best) / n
        row["best_s"] = (time.perf_counter() - start) / n
    return row


def fmt(v, digits=1):
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def table(rows, backends, paper):
    cols = [b for b in backends if b != "attack"]
    head = ["model (eps)", "clean %", "PGD ceiling % (paper)"]
    head += [f"{b} %" for b in cols] + ["best %", "SDP-CROWN % (paper)",
                                        "alpha-CROWN / LipNaive / LipSDP % (paper)",
                                        "l2prop s/img", "best s/img", "SDP-CROWN s/img (GPU)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = paper.get(r["model"], {})
        cells = [f"{r['model']} ({r['eps']:.4g})", fmt(r["clean"]),
                 f"{fmt(r.get('pgd'))} ({fmt(p.get('pgd'))})"]
        cells += [fmt(r.get(b)) for b in cols]
        cells += [fmt(r.get("best")), fmt(p.get("sdp_crown")),
                  f"{fmt(p.get('alpha_crown'))} / {fmt(p.get('lip_naive'))} / "
                  f"{fmt(p.get('lip_sdp'))}",
                  fmt(r.get("l2prop_s"), 2), fmt(r.get("best_s"), 2), fmt(p.get("sdp_crown_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--limit", type=int, default=None, help="First N images (default all).")
    parser.add_argument("--models", default=None, help="Comma-separated model names.")
    parser.add_argument("--backends", default=None, help="Comma-separated backend names.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the table here.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(args.config)
    models = args.models.split(",") if args.models else list(cfg["models"])
    backends = args.backends.split(",") if args.backends else list(cfg["backends"])
    limit = args.limit or cfg.get("images", 200)
    registry = BackendRegistry.from_entry_points()
    rows = []
    for name in models:
        rows.append(run_model(cfg, name, backends, limit, registry))
        print(table(rows[-1:], backends, cfg.get("paper", {})), flush=True)
    text = table(rows, backends, cfg.get("paper", {}))
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
