"""VNN-COMP integration: VNN-LIB properties, instance runs, result files, benchmark folders.

Example:
    >>> from lipverify.vnncomp import parse_vnnlib_text
    >>> spec = parse_vnnlib_text("(declare-const X_0 Real)(declare-const Y_0 Real)"
    ...                          "(assert (>= X_0 0))(assert (<= X_0 1))(assert (<= Y_0 0))")
    >>> spec.num_inputs, len(spec.cases), spec.cases[0].prop.violated([-1.0])
    (1, 1, True)

"""

from lipverify.vnncomp.batch import (
    BatchOptions,
    BatchRow,
    Instance,
    iter_batch,
    read_instances,
    read_results,
    run_batch,
)
from lipverify.vnncomp.check import Counterexample, OnnxOracle, check_counterexample
from lipverify.vnncomp.results import (
    VnncompResult,
    format_counterexample,
    parse_counterexample,
    read_result,
    result_from_status,
    write_result,
)
from lipverify.vnncomp.runner import InstanceResult, RunOptions, prepare, run_instance
from lipverify.vnncomp.vnnlib import (
    SpecCase,
    VnnlibError,
    VnnlibSpec,
    parse_vnnlib_text,
    read_vnnlib,
)

__all__ = [
    "BatchOptions",
    "BatchRow",
    "Counterexample",
    "Instance",
    "InstanceResult",
    "OnnxOracle",
    "RunOptions",
    "SpecCase",
    "VnncompResult",
    "VnnlibError",
    "VnnlibSpec",
    "check_counterexample",
    "format_counterexample",
    "iter_batch",
    "parse_counterexample",
    "parse_vnnlib_text",
    "prepare",
    "read_instances",
    "read_result",
    "read_results",
    "read_vnnlib",
    "result_from_status",
    "run_batch",
    "run_instance",
    "write_result",
]
