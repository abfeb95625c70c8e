"""lipverify-eclipse: ECLipsE and ECLipsE-Fast Lipschitz bounds as lipverify backends.

Installing this package registers the `eclipse` and `eclipse-fast` backends through the
`lipverify.backends` entry points; nothing in lipverify changes.
"""

from importlib.metadata import PackageNotFoundError, version

from lipverify_eclipse.backend import EclipseBackend, EclipseFastBackend, EclipseOptions
from lipverify_eclipse.lmi import CertificateError, ChainCertificate, prove_chain

try:
    __version__ = version("lipverify-eclipse")
except PackageNotFoundError:  # imported from a source tree
    __version__ = "0+unknown"

__all__ = ["CertificateError", "ChainCertificate", "EclipseBackend", "EclipseFastBackend",
           "EclipseOptions", "__version__", "prove_chain"]
