"""Every built-in backend, and the example plug-in's, passes the public conformance kit.

Built-ins are read from lipverify's real `lipverify.backends` entry points, so a backend added
to `pyproject.toml` is checked without editing this file. The example plug-in
(`plugins/lipverify-eclipse`) is checked from its installed copy when installed, else from its
source tree. A backend that cannot run here is skipped with the registry's reason.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from lipverify.backends.l2prop import L2PropOptions
from lipverify.backends.lirpa import LirpaOptions
from lipverify.backends.registry import BackendRegistry
from lipverify.testing import ConformanceZoo, check_backend, one_torch_thread

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins" / "lipverify-eclipse"
PLUGIN_CLASSES = {"eclipse": "EclipseBackend", "eclipse-fast": "EclipseFastBackend"}
# Options that keep a backend's kit run to a few seconds (every code path still runs: fewer
# optimisation steps and a coarser radius bracket only loosen the bounds), so every built-in is
# checked in the default run.
CHEAP_OPTIONS: dict[str, object] = {
    "alpha-crown": LirpaOptions(alpha_iterations=4, radius_rel_tol=0.05),
    "l2prop": L2PropOptions(iterations=5, radius_steps=4),
}
REGISTRY = BackendRegistry.from_entry_points()
BUILTINS = [n for n in REGISTRY.names if REGISTRY.entry(n).distribution.startswith("lipverify ")]


@pytest.fixture(scope="module")
def zoo():
    with one_torch_thread():
        return ConformanceZoo()


def _run(backend, zoo):
    report = check_backend(backend, zoo=zoo)
    assert report.passed, str(report)
    return report


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_backend(name, zoo):
    info = REGISTRY.info(name)
    if not info.available:
        pytest.skip(f"{name} unavailable here: {info.why}")
    _run(REGISTRY.create(name, CHEAP_OPTIONS.get(name)), zoo)


@pytest.fixture()
def plugin(monkeypatch):
    """The plug-in's module: the installed one, else the source tree's."""
    if importlib.util.find_spec("lipverify_eclipse") is None:
        monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    return importlib.import_module("lipverify_eclipse")


@pytest.mark.parametrize("name", list(PLUGIN_CLASSES))
def test_example_plugin_backend(name, plugin, zoo):
    cls = getattr(plugin, PLUGIN_CLASSES[name])
    missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)} (pip install eclipse-nn)")
    _run(cls(), zoo)


def test_the_kit_is_not_skipping_everything(zoo):
    """The cheapest built-in must be available and checked, whatever else is skipped."""
    assert "spectral" in BUILTINS and REGISTRY.info("spectral").available
    report = _run(REGISTRY.create("spectral"), zoo)
    assert report.passed, str(report)


def _documented_example() -> dict:
    """The first Python block after "A complete example" in docs/writing-a-backend.md."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "writing-a-backend.md").read_text()
    section = doc.split("## A complete example", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {"__name__": "lipverify_frobenius"}
    exec(compile(code, "writing-a-backend.md", "exec"), namespace)  # noqa: S102 - our own doc
    return namespace


def test_documented_example_backend(zoo):
    """The README's example backend is complete and passes the kit."""
    backend = _documented_example()["FrobeniusBackend"]()
    report = _run(backend, zoo)
    assert report.passed, str(report)
    registry = BackendRegistry.from_classes([type(backend)])
    assert registry.status() == [("frobenius", "local", None)]
