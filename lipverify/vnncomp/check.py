"""Counterexamples checked on the ORIGINAL ONNX file with onnxruntime, before `sat` is written.

A candidate input is accepted only when it lies in the case's box within `ACCEPT_TOLERANCE`
(half the competition's `BOX_TOLERANCE`, so no checker's float64 rounding can put it outside)
and the outputs onnxruntime computes for exactly the values that will be written violate the
property (slack < 0, no tolerance). The candidate is first projected onto the box and rounded to
the network's input dtype; where that dtype has no value inside the box (a bound such as
lower == upper == 0.1, which float32 cannot represent) the point takes a neighbouring value,
one step outside. The backends search the box rounded outward to float32 (`worker.py`), so the
candidate as found (rounded to the input dtype) is tried too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lipverify.errors import ModelError
from lipverify.vnncomp.vnnlib import SpecCase

log = logging.getLogger(__name__)

# The competition accepts counterexamples up to this far outside the input box.
BOX_TOLERANCE = 1e-4
# Counterexamples are accepted up to this far outside the box: a float32 step around any value
# below 512 in magnitude, with room to spare for how the competition's checker rounds.
ACCEPT_TOLERANCE = BOX_TOLERANCE / 2
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
               "tensor(float16)": np.float16}


@dataclass(frozen=True)
class Counterexample:
    """An input (as written) and the outputs onnxruntime computes for it."""

    x: np.ndarray
    y: np.ndarray
    margin: float


class OnnxOracle:
    """Evaluates the original ONNX file with onnxruntime on flat inputs."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort  # a hard dependency, imported late to keep the CLI quick

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            raise ModelError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") \
                from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{path} has {len(inputs)} inputs; VNN-COMP networks have one")
        if len(self.session.get_outputs()) != 1:
            raise ModelError(f"{path} has {len(self.session.get_outputs())} outputs; VNN-COMP "
                             "networks have one")
        self.input_name = inputs[0].name
        self.dtype = _ORT_DTYPES.get(inputs[0].type)
        if self.dtype is None:
            raise ModelError(f"{path}: unsupported input type {inputs[0].type}")
        self.input_shape = tuple(d if isinstance(d, int) and d > 0 else 1
                                 for d in inputs[0].shape)
        self.num_inputs = math.prod(self.input_shape)
        self.num_outputs = int(self.outputs(np.zeros(self.num_inputs)).size)

    def cast(self, x: np.ndarray) -> np.ndarray:
        """`x` rounded to the network's input dtype (as float64: the values that are written)."""
        return np.asarray(x, dtype=np.float64).astype(self.dtype).astype(np.float64)

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """Flat float64 outputs for one flat input."""
        x = np.asarray(x, dtype=np.float64)
        if x.size != self.num_inputs:
            raise ModelError(f"network takes {self.num_inputs} inputs, got {x.size}")
        feed = {self.input_name: x.astype(self.dtype).reshape(self.input_shape)}
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float64).reshape(-1)


def project_to_box(x: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                   oracle: OnnxOracle) -> np.ndarray:
    """`x` clipped to the box, then rounded to the input dtype without leaving the box."""
    clipped = np.clip(np.asarray(x, dtype=np.float64).reshape(-1), lower, upper)
    rounded = oracle.cast(clipped)
    dtype = oracle.dtype
    # Rounding may step just outside a bound that the dtype cannot represent: step back inside.
    low = rounded < lower
    rounded[low] = np.nextafter(rounded[low].astype(dtype), dtype(np.inf)).astype(np.float64)
    high = rounded > upper
    rounded[high] = np.nextafter(rounded[high].astype(dtype), dtype(-np.inf)).astype(np.float64)
    return rounded


def in_box(x: np.ndarray, case: SpecCase, tolerance: float = ACCEPT_TOLERANCE) -> bool:
    """True when every coordinate lies in the box within `tolerance`."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return bool(x.shape == case.lower.shape and np.all(x >= case.lower - tolerance)
                and np.all(x <= case.upper + tolerance))


def check_counterexample(oracle: OnnxOracle, case: SpecCase, x: np.ndarray,
                         tolerance: float = ACCEPT_TOLERANCE) -> Counterexample | None:
    """The written form of `x` when it is a real counterexample of `case`, else None."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if x.size != case.lower.size or not np.all(np.isfinite(x)):
        return None
    # Inside the box first; then the box point rounded to nearest (one step outside where the
    # dtype has no value at the bound); then the candidate as found.
    nearest = oracle.cast(np.clip(x, case.lower, case.upper))
    for candidate in (project_to_box(x, case.lower, case.upper, oracle), nearest,
                      oracle.cast(x)):
        if not in_box(candidate, case, tolerance):
            continue
        y = oracle.outputs(candidate)
        margin = case.prop.margin(y)
        # Strictly below zero: `<` in a property is parsed as `<=`, so a point exactly on the
        # boundary is never offered as a counterexample.
        if np.all(np.isfinite(y)) and margin < 0:
            return Counterexample(candidate, y, margin)
    log.info("candidate counterexample rejected by onnxruntime")
    return None
