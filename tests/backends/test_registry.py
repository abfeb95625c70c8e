"""The backend registry, with faked entry-point metadata (nothing is installed)."""

from __future__ import annotations

import importlib.metadata
import logging
import textwrap
from dataclasses import dataclass

import pytest

from lipverify.backends.registry import (
    GROUP,
    BackendEntry,
    BackendRegistry,
    BackendValidationError,
    DuplicateBackendError,
    protocol_problems,
)
from lipverify.errors import BackendUnavailable, InputError

PLUGIN = textwrap.dedent('''
    from lipverify.backends.base import BackendBase
    from lipverify.types import Certificate, Norm, Status

    LOADS = []


    class GoodBackend(BackendBase):
        name = "good"
        cost = 5
        norms = frozenset({Norm.L2})

        def certify(self, network, problem):
            return [Certificate(Status.UNKNOWN, self.name) for _ in range(len(problem))]


    class CheapBackend(GoodBackend):
        name = "cheap"
        cost = 1


    class NeedsMissing(GoodBackend):
        name = "needy"
        requires = ("surely_not_installed_module_xyz",)


    class BrokenInit(GoodBackend):
        name = "brokeninit"

        def __init__(self, options=None):
            raise RuntimeError("no licence")


    class NoCertify:
        name = "nocertify"
        cost = 1
        norms = frozenset({Norm.L2})
        sound = True
        requires = ()

        def supports(self, network, problem):
            return None


    class BadTypes(GoodBackend):
        name = "badtypes"
        cost = "cheap"
        norms = frozenset({"2"})


    not_a_class = GoodBackend()
''')

BROKEN = "import not_a_module_that_exists_anywhere\n"


@dataclass(frozen=True)
class FakeDist:
    name: str
    version: str


@dataclass(frozen=True)
class FakeEntryPoint:
    """Duck-types `importlib.metadata.EntryPoint` (name, value, group, dist, load)."""

    name: str
    value: str
    dist: FakeDist | None = None
    group: str = GROUP

    def load(self) -> object:
        return importlib.metadata.EntryPoint(self.name, self.value, self.group).load()


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "fakeplugin_reg.py").write_text(PLUGIN)
    (tmp_path / "brokenplugin_reg.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def fake_metadata(monkeypatch, eps):
    calls = []

    def entry_points(**kwargs):
        calls.append(kwargs)
        return [ep for ep in eps if ep.group == kwargs.get("group")]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return calls


DIST = FakeDist("lipverify-fake", "1.2")


def ep(name, attr=None, dist=DIST, module="fakeplugin_reg"):
    return FakeEntryPoint(name, f"{module}:{attr or name.capitalize() + 'Backend'}", dist)


def test_reads_the_group_and_records_the_distribution(monkeypatch, plugin_dir):
    calls = fake_metadata(monkeypatch, [ep("good"), FakeEntryPoint("other", "x:y", DIST, "else")])
    reg = BackendRegistry.from_entry_points()
    assert calls == [{"group": GROUP}]
    assert reg.names == ["good"]
    info = reg.info("good")
    assert info.available and info.distribution == "lipverify-fake 1.2"
    assert info.value == "fakeplugin_reg:GoodBackend"
    assert (info.cost, info.sound, info.norms) == (5, True, ("2",))
    assert reg.create("good").name == "good"


def test_entry_points_are_loaded_only_when_selected(monkeypatch, plugin_dir):
    (plugin_dir / "lazyplugin_reg.py").write_text(PLUGIN + "\nraise SystemExit('imported!')\n")
    fake_metadata(monkeypatch, [ep("good"), ep("lazy", "GoodBackend", module="lazyplugin_reg")])
    reg = BackendRegistry.from_entry_points()
    assert reg.names == ["good", "lazy"]  # listing does not import anything
    assert reg.create("good").name == "good"  # only the selected module is imported
    import sys
    assert "lazyplugin_reg" not in sys.modules


def test_real_entry_point_objects_without_distribution(monkeypatch, plugin_dir):
    real = importlib.metadata.EntryPoint("good", "fakeplugin_reg:GoodBackend", GROUP)
    fake_metadata(monkeypatch, [real])
    reg = BackendRegistry.from_entry_points()
    assert reg.status() == [("good", "unknown", None)]


def test_failing_import_becomes_unavailable(monkeypatch, plugin_dir):
    fake_metadata(monkeypatch, [ep("good"), ep("broken", "X", module="brokenplugin_reg")])
    reg = BackendRegistry.from_entry_points()
    rows = dict((n, why) for n, _, why in reg.status())
    assert rows["good"] is None
    assert rows["broken"].startswith("cannot load brokenplugin_reg:X: ModuleNotFoundError")
    assert "not_a_module_that_exists_anywhere" in rows["broken"]
    with pytest.raises(BackendUnavailable, match="broken: unavailable: cannot load"):
        reg.create("broken")
    assert reg.available_names() == ["good"]


def test_missing_required_module_and_failing_constructor(monkeypatch, plugin_dir):
    fake_metadata(monkeypatch, [ep("needy", "NeedsMissing"), ep("brokeninit", "BrokenInit")])
    reg = BackendRegistry.from_entry_points()
    rows = dict((n, why) for n, _, why in reg.status())
    assert rows["needy"] == "missing module(s): surely_not_installed_module_xyz"
    assert rows["brokeninit"] == "constructor failed: RuntimeError: no licence"
    with pytest.raises(BackendUnavailable, match="constructor failed"):
        reg.create("brokeninit")


@pytest.mark.parametrize(("name", "attr", "expect"), [
    ("nocertify", "NoCertify", "missing certify"),
    ("badtypes", "BadTypes", "cost must be an int"),
    ("badtypes", "BadTypes", "norms must be a non-empty frozenset of Norm"),
    ("notaclass", "not_a_class", "is not a class"),
    ("wrongname", "GoodBackend", "class says its name is 'good', the entry point says "
                                 "'wrongname'"),
])
def test_protocol_is_validated(monkeypatch, plugin_dir, name, attr, expect):
    fake_metadata(monkeypatch, [ep(name, attr)])
    reg = BackendRegistry.from_entry_points()
    with pytest.raises(BackendValidationError, match="does not implement the verifier protocol"):
        reg.create(name)
    (_, _, why), = reg.status()
    assert expect in why


def test_duplicate_names_are_rejected_without_breaking_the_rest(monkeypatch, plugin_dir, caplog):
    other = FakeDist("lipverify-other", "0.3")
    fake_metadata(monkeypatch, [ep("good"), ep("cheap"),
                                FakeEntryPoint("good", "fakeplugin_reg:CheapBackend", other)])
    with caplog.at_level(logging.WARNING):
        reg = BackendRegistry.from_entry_points()
    assert "registered twice" in caplog.text
    with pytest.raises(DuplicateBackendError, match="lipverify-fake 1.2 .* and lipverify-other"):
        reg.create("good")
    rows = dict((n, why) for n, _, why in reg.status())
    assert rows["good"].startswith("registered twice")
    assert rows["cheap"] is None
    assert isinstance(DuplicateBackendError("x"), InputError)


def test_the_same_entry_twice_is_not_a_conflict(plugin_dir):
    entry = BackendEntry("good", "fakeplugin_reg:GoodBackend", "d 1")
    reg = BackendRegistry([entry, entry])
    assert reg.names == ["good"]


def test_disable_backend(monkeypatch, plugin_dir, caplog):
    other = FakeDist("lipverify-other", "0.3")
    fake_metadata(monkeypatch, [ep("good"), ep("cheap"),
                                FakeEntryPoint("cheap", "fakeplugin_reg:GoodBackend", other)])
    with caplog.at_level(logging.WARNING):
        reg = BackendRegistry.from_entry_points(disabled=["cheap", "nosuch"])
    assert "nosuch" in caplog.text
    assert reg.names == ["good"]  # disabling also removes a conflicting name
    assert "cheap" not in reg
    with pytest.raises(InputError, match="disabled"):
        reg.create("cheap")
    with pytest.raises(InputError, match="unknown backend 'other'; known: good"):
        reg.create("other")


def test_create_many_orders_by_cost_and_passes_options(monkeypatch, plugin_dir):
    fake_metadata(monkeypatch, [ep("good"), ep("cheap")])
    reg = BackendRegistry.from_entry_points()
    assert [b.name for b in reg.create_many(["good", "cheap", "good"])] == ["cheap", "good"]
    opts = reg.load("good").Options(seed=7)
    assert reg.create("good", opts).options.seed == 7


def test_registry_from_classes_and_protocol_problems(plugin_dir):
    import fakeplugin_reg as mod

    reg = BackendRegistry.from_classes([mod.GoodBackend, mod.CheapBackend])
    assert reg.names == ["cheap", "good"]
    assert reg.info("cheap").distribution == "local"
    assert protocol_problems(mod.GoodBackend) == []
    assert protocol_problems(mod.GoodBackend, "other") != []


def test_registries_are_independent(monkeypatch, plugin_dir):
    fake_metadata(monkeypatch, [ep("good")])
    a = BackendRegistry.from_entry_points()
    b = BackendRegistry.from_entry_points(disabled=["good"])
    assert a.names == ["good"] and b.names == []


def test_builtins_are_declared_by_lipverify():
    """The real metadata: lipverify's own pyproject declares its built-ins the same way."""
    reg = BackendRegistry.from_entry_points()
    for name in ("spectral", "lipsdp", "attack"):
        assert name in reg
        assert reg.entry(name).distribution.startswith("lipverify ")
