"""Run lipverify on the shared VNN-COMP benchmarks and score it against the known answers.

    .venv/bin/python benchmarks/bench_vnncomp.py --timeout 30
    .venv/bin/python benchmarks/bench_vnncomp.py --benchmarks test_2021 --timeout 10 --limit 5

Each benchmark folder is run through the same batch runner as `lipverify vnncomp --instances`
(resumable: results go to OUT/<benchmark>/results.csv and one result file per instance), each
instance with its own timeout capped at --timeout. Every `sat` counterexample is re-checked
here with a fresh onnxruntime session of the original ONNX file. The table counts, against
`expected.csv`: verified (unsat, expected unsat), falsified (sat, expected sat), unknown /
timeout / error, and WRONG answers (unsat where sat is known, sat where unsat is known, or a
sat whose counterexample fails the check). Exit status 1 when anything is wrong.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lipverify.vnncomp.batch import BatchOptions, Instance, iter_batch, read_results
from lipverify.vnncomp.results import read_result
from lipverify.vnncomp.runner import RunOptions
from lipverify.vnncomp.vnnlib import read_vnnlib

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BENCH = REPO.parent / "shared" / "benchmarks" / "vnncomp"
BENCHMARKS = ("test_2021", "mnist_fc_2022", "oval21_2022")
BOX_TOL = 1e-4
REFERENCE_TOOLS = ("alpha_beta_crown", "a-b-CROWN", "mn_bab", "verinet", "VeriNet")


def check_counterexample(onnx_path: Path, vnnlib_path: Path, x: np.ndarray) -> str | None:
    """None when `x` is a real counterexample (fresh onnxruntime session), else why not."""
    spec = read_vnnlib(vnnlib_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    dtype = np.float64 if inp.type == "tensor(double)" else np.float32
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    if x.size != spec.num_inputs:
        return f"{x.size} inputs, the property has {spec.num_inputs}"
    y = session.run(None, {inp.name: x.astype(dtype).reshape(shape)})[0].reshape(-1)
    for case in spec.cases:
        inside = np.all(x >= case.lower - BOX_TOL) and np.all(x <= case.upper + BOX_TOL)
        if inside and case.prop.violated(y.astype(np.float64)):
            return None
    return "not in a box, or the outputs do not violate the property"


def reference_counts(folder: Path) -> dict[str, int]:
    """Correct answers per reference tool in the competition (results_by_tool.csv)."""
    expected = {(r["onnx"], r["vnnlib"]): r["expected"] for r in _rows(folder / "expected.csv")}
    counts: Counter[str] = Counter()
    for row in _rows(folder / "results_by_tool.csv"):
        want = expected.get((row["onnx"], row["vnnlib"]))
        if row["tool"] in REFERENCE_TOOLS and want in ("sat", "unsat") and row["result"] == want:
            counts[row["tool"]] += 1
    return dict(counts)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def score(folder: Path, out: Path, network: str | None = None) -> dict[str, object]:
    """Compare the results in `out` with the known answers of `folder` (one network's only)."""
    expected = {(r["onnx"], r["vnnlib"]): r["expected"] for r in _rows(folder / "expected.csv")}
    tally: Counter[str] = Counter()
    times: list[float] = []
    wrong: list[str] = []
    for row in read_results(out / "results.csv"):
        if network is not None and Path(row.onnx).stem != network:
            continue
        key = (row.onnx, row.vnnlib)
        want, got = expected.get(key, "unknown"), row.result.value
        tally[got] += 1
        name = f"{Path(row.onnx).stem} {Path(row.vnnlib).stem}"
        if got == "sat":
            inst = Instance(row.onnx, row.vnnlib, 0.0, folder)
            _, cex = read_result(out / "files" / inst.result_name)
            why = check_counterexample(inst.onnx_path, inst.vnnlib_path, cex[0])
            if why is not None or want == "unsat":
                wrong.append(f"{name}: sat ({why or 'expected unsat'})")
        elif got == "unsat" and want == "sat":
            wrong.append(f"{name}: unsat, expected sat")
        if got in ("sat", "unsat") and (want == got):
            tally["correct_" + got] += 1
            times.append(row.run_time)
        tally["expected_" + want] += 1
        tally["run_time"] += row.run_time
    reference = reference_counts(folder) if network is None else {}
    return {"tally": tally, "times": times, "wrong": wrong, "reference": reference}


def table(scores: dict[str, dict[str, object]], timeout: float) -> str:
    """The Markdown results table."""
    lines = ["| benchmark | instances (sat/unsat/unknown known) | verified (unsat) | "
             "falsified (sat) | unknown | timeout | error | **wrong** | median s (solved) | "
             "total s | best complete tool (competition, GPU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for bench, s in scores.items():
        t: Counter[str] = s["tally"]  # type: ignore[assignment]
        n = sum(t[k] for k in ("sat", "unsat", "unknown", "timeout", "error"))
        known = f"{t['expected_sat']}/{t['expected_unsat']}/{t['expected_unknown']}"
        times: list[float] = s["times"]  # type: ignore[assignment]
        med = f"{statistics.median(times):.1f}" if times else "-"
        ref: dict[str, int] = s["reference"]  # type: ignore[assignment]
        best = max(ref.items(), key=lambda kv: kv[1]) if ref else None
        best_text = f"{best[0]} {best[1]}/{n}" if best else "-"
        lines.append(f"| {bench} | {n} ({known}) | {t['correct_unsat']} | {t['correct_sat']} | "
                     f"{t['unknown']} | {t['timeout']} | {t['error']} | "
                     f"**{len(s['wrong'])}** | {med} | {t['run_time']:.0f} | {best_text} |")
    lines.append("")
    lines.append(f"Per-instance timeout: min(instances.csv timeout, {timeout:g} s).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH)
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="Cap on each instance's timeout (seconds).")
    parser.add_argument("--out", type=Path, default=REPO / "results_vnncomp",
                        help="Where results CSVs and result files go (resumable).")
    parser.add_argument("--backends", default="", help="Comma-separated backends (default all).")
    parser.add_argument("--limit", type=int, default=None, help="First N instances only.")
    parser.add_argument("--markdown", type=Path, default=None, help="Also write the table here.")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = tuple(n.strip() for n in args.backends.split(",") if n.strip())
    scores = {}
    start = time.monotonic()
    for bench in [b.strip() for b in args.benchmarks.split(",") if b.strip()]:
        folder = args.bench_dir / bench
        out = args.out / bench
        options = BatchOptions(run=RunOptions(backends=names), category=bench,
                               max_timeout=args.timeout, result_dir=out / "files",
                               progress=not args.no_progress, limit=args.limit)
        for instance, _, answer in iter_batch(folder / "instances.csv", out / "results.csv",
                                              options):
            logging.info("%s %s: %s", instance.onnx, instance.vnnlib, answer.result.value)
        scores[bench] = score(folder, out)
        rows = read_results(out / "results.csv")
        networks = sorted({Path(r.onnx).stem for r in rows})
        if 1 < len(networks) and 3 * len(networks) <= len(rows):  # a breakdown worth a row
            for net in networks:
                scores[f"&nbsp;&nbsp;{net}"] = score(folder, out, net)
    text = table(scores, args.timeout)
    print(text)
    for bench, s in scores.items():
        for line in s["wrong"] if not bench.startswith("&") else ():  # type: ignore[union-attr]
            print(f"WRONG {bench}: {line}")
    print(f"\nwall time {time.monotonic() - start:.0f} s")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 1 if any(s["wrong"] for s in scores.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
