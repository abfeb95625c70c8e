"""lipverify: sound certified-robustness verification of neural networks."""

from importlib.metadata import PackageNotFoundError, version

from lipverify.api import (
    CertifyResult,
    LipschitzReport,
    LowerLipschitzReport,
    ParameterLipschitzReport,
    certify,
    compare,
    lipschitz,
    lower_lipschitz,
    parameter_lipschitz,
)
from lipverify.types import (
    Certificate,
    LipschitzBound,
    Norm,
    Perturbation,
    Problem,
    Property,
    Scope,
    Status,
)

try:
    __version__ = version("lipverify")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "Certificate",
    "CertifyResult",
    "LipschitzBound",
    "LipschitzReport",
    "LowerLipschitzReport",
    "Norm",
    "ParameterLipschitzReport",
    "Perturbation",
    "Problem",
    "Property",
    "Scope",
    "Status",
    "__version__",
    "certify",
    "compare",
    "lipschitz",
    "lower_lipschitz",
    "parameter_lipschitz",
]
