"""The auto_LiRPA compatibility patches: applied once, each restoring the old behaviour."""

import subprocess
import sys

import numpy as np
import torch
from torch import nn

from lipverify.backends._lirpa_compat import (
    LIRPA_OPSET,
    _node_getitem,
    _onnx_globals,
    lirpa_availability,
    load_auto_lirpa,
)


def test_loads_and_is_idempotent():
    first = load_auto_lirpa()
    patched = (torch.onnx.symbolic_helper._set_opset_version, torch._C.Node.__getitem__,
               sys.modules["numpy.lib.arraysetops"], first.BoundedModule._named_members)
    second = load_auto_lirpa()
    assert second is first
    again = (torch.onnx.symbolic_helper._set_opset_version, torch._C.Node.__getitem__,
             sys.modules["numpy.lib.arraysetops"], first.BoundedModule._named_members)
    assert again == patched
    assert lirpa_availability() is None


def test_opset_setter_writes_onnx_globals():
    load_auto_lirpa()
    glob = _onnx_globals()
    before = glob.export_onnx_opset_version
    try:
        torch.onnx.symbolic_helper._set_opset_version(LIRPA_OPSET + 1)
        assert glob.export_onnx_opset_version == LIRPA_OPSET + 1
    finally:
        glob.export_onnx_opset_version = before


def test_node_getitem_reads_attributes_by_kind():
    graph = torch.jit.trace(lambda x: x * 2.5 + 3, torch.ones(2)).graph
    consts = [n for n in graph.nodes() if n.kind() == "prim::Constant" and
              "value" in n.attributeNames()]
    assert consts
    for node in consts:
        kind = node.kindOf("value")
        expected = getattr(node, kind)("value")
        got = _node_getitem(node, "value")
        assert type(got) is type(expected)
        if isinstance(got, torch.Tensor):
            assert torch.equal(got, expected)
        else:
            assert got == expected
    load_auto_lirpa()
    assert all(torch.equal(n["value"], n.t("value")) if n.kindOf("value") == "t"
               else n["value"] == getattr(n, n.kindOf("value"))("value") for n in consts)


def test_arraysetops_shim_is_numpy_isin():
    load_auto_lirpa()
    from numpy.lib.arraysetops import isin

    a, b = np.array([1, 2, 3, 4]), np.array([2, 4, 9])
    assert np.array_equal(isin(a, b), np.isin(a, b))


def test_bounded_module_lists_parameters_and_bounds():
    lirpa = load_auto_lirpa()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(2 * 4 * 4, 3))
    bounded = lirpa.BoundedModule(net, torch.zeros(1, 1, 4, 4))
    names = [n for n, _ in bounded.named_parameters()]
    assert len(names) == 4
    x = torch.rand(2, 1, 4, 4)
    ptb = lirpa.PerturbationLpNorm(norm=np.inf, eps=0.1)
    lower, upper = bounded.compute_bounds(x=(lirpa.BoundedTensor(x, ptb),), method="CROWN")
    y = net(x)
    assert torch.all(lower <= y + 1e-6) and torch.all(y <= upper + 1e-6)


def test_import_leaves_warning_filters_and_root_logger_alone():
    code = ("import logging, warnings, torch\n"
            "before = list(warnings.filters)\n"
            "handlers = list(logging.getLogger().handlers)\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    from lipverify.backends._lirpa_compat import load_auto_lirpa\n"
            "    load_auto_lirpa()\n"
            "assert not [w for w in seen if 'jit.script' in str(w.message)], seen\n"
            "load_auto_lirpa()\n"
            "assert list(warnings.filters) == before\n"
            "assert logging.getLogger().handlers == handlers\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
