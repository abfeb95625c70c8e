"""Fixtures of the VNN-COMP tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixed_input import FIXED_INPUT_VNNLIB, fixed_input_onnx


@pytest.fixture
def fixed_input_instance(tmp_path: Path) -> tuple[Path, Path]:
    """(onnx, vnnlib) of the issue-15 case: `sat` within the competition's tolerance, never
    `unsat` (the box centre is safe, so the falsifier or nothing must find it)."""
    prop = tmp_path / "fixed.vnnlib"
    prop.write_text(FIXED_INPUT_VNNLIB)
    return fixed_input_onnx(tmp_path / "fixed.onnx"), prop
