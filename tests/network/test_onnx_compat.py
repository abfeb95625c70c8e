"""The torchvision stand-in for onnx2torch, each case in a fresh interpreter."""

import subprocess
import sys
import textwrap

import pytest


def _run(code, tmp_path, *, path_first=False):
    """Run `code` in a fresh Python; `tmp_path` goes on sys.path (first, to shadow packages)."""
    where = 0 if path_first else "len(sys.path)"
    prelude = f"import sys; sys.path.insert({where}, {str(tmp_path)!r})\n"
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_stub_when_torchvision_is_missing(tmp_path):
    out = _run("""
        import importlib.util, sys
        if importlib.util.find_spec("torchvision") is not None:
            print("real-installed"); raise SystemExit
        from lipverify.network._torchvision_compat import import_onnx2torch, is_stub
        onnx2torch = import_onnx2torch()
        import torchvision.ops
        assert is_stub() and hasattr(onnx2torch, "convert")
        try:
            torchvision.ops.nms(None, None, 0.5)
        except NotImplementedError as exc:
            print("raised", exc)
    """, tmp_path)
    if "real-installed" in out:
        pytest.skip("a real torchvision is installed here")
    assert "raised torchvision.ops.nms is unavailable" in out


def test_half_imported_torchvision_is_cleaned_up(tmp_path):
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "extension.py").write_text("LOADED = True\n")
    (package / "__init__.py").write_text(
        "from torchvision import extension\n"
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    out = _run("""
        import sys
        from lipverify.network._torchvision_compat import ensure_torchvision, is_stub
        assert ensure_torchvision() is False
        assert is_stub(sys.modules["torchvision"])
        assert "torchvision.extension" not in sys.modules
        from torchvision.ops import roi_align
        import onnx2torch
        print("ok", roi_align.__name__)
    """, tmp_path, path_first=True)
    assert "ok roi_align" in out


def test_working_torchvision_is_kept(tmp_path):
    package = tmp_path / "torchvision"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("from torchvision import ops\nREAL = True\n")
    (package / "ops" / "__init__.py").write_text(
        "def nms(*a):\n    return 'real nms'\n"
        "def roi_align(*a):\n    return 'real roi'\ndef box_convert(*a):\n    return None\n")
    out = _run("""
        import sys
        from lipverify.network._torchvision_compat import ensure_torchvision, is_stub
        assert ensure_torchvision() is True
        import torchvision
        assert torchvision.REAL and not is_stub()
        assert ensure_torchvision() is True  # idempotent
        print(torchvision.ops.nms())
    """, tmp_path, path_first=True)
    assert "real nms" in out
