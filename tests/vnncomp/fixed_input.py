"""The issue-15 instance: an input fixed at a decimal float32 cannot represent (lower == upper)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# X_0 is fixed at this decimal (lower == upper), which has no float32 value: its float32
# neighbours are FIXED_BELOW < 0.1 < FIXED_ABOVE (the nearest, 1.49e-9 above).
FIXED = "0.1"
FIXED_ABOVE = float(np.float32(0.1))
FIXED_BELOW = float(np.nextafter(np.float32(0.1), np.float32(0)))
# The network's steepness in X_0 below FIXED_ABOVE.
STEEP = 1e7


def fixed_input_onnx(path: Path) -> Path:
    """y = 1.01 - |x1| - STEEP * relu(FIXED_ABOVE - x0), in float32.

    For x1 in [-1, 1]: at x0 = FIXED_ABOVE the output stays >= 0.01 (the property `y <= 0`
    holds), at the real 0.1 it reaches 0.01 - 0.0149 < 0 and at FIXED_BELOW 0.01 - 0.0745 < 0
    (violated, |x1| = 1). Every operation is exact in float32 at these points.
    """
    w1 = np.array([[0, 1], [0, -1], [-1, 0]], np.float32)
    b1 = np.array([0, 0, FIXED_ABOVE], np.float32)
    w2 = np.array([[-1, -1, -STEEP]], np.float32)
    b2 = np.array([1.01], np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["z"], transB=1),
             helper.make_node("Relu", ["z"], ["h"]),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], transB=1)]
    weights = [numpy_helper.from_array(a, name)
               for a, name in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    graph = helper.make_graph(
        nodes, "fixed_input", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


FIXED_INPUT_VNNLIB = ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n"
                      "(declare-const Y_0 Real)\n"
                      f"(assert (>= X_0 {FIXED}))\n(assert (<= X_0 {FIXED}))\n"
                      "(assert (>= X_1 -1))\n(assert (<= X_1 1))\n(assert (<= Y_0 0))\n")
