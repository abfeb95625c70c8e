"""LipSDP (Fazlyab et al., NeurIPS 2019): proven L2 Lipschitz bounds of feed-forward networks.

`lipsdp_bound` is the reusable entry point (per-neuron slope intervals, so other backends can
ask for masked LipSDP with neurons fixed active or inactive); `chain_from_layers` turns a
network's layer view into the chain it reads.
"""

from lipverify.sdp.assembly import Form
from lipverify.sdp.bound import SDPBound, SDPOptions, chain_bound, lipsdp_bound, split_bound
from lipverify.sdp.chain import Chain, chain_from_layers, split_chain, unsupported_reason
from lipverify.sdp.check import CertificationError
from lipverify.sdp.memory import MemoryEstimate, estimate
from lipverify.sdp.solve import STATUS_MAP, SolveError, Solver, Verdict

__all__ = [
    "STATUS_MAP",
    "CertificationError",
    "Chain",
    "Form",
    "MemoryEstimate",
    "SDPBound",
    "SDPOptions",
    "SolveError",
    "Solver",
    "Verdict",
    "chain_bound",
    "chain_from_layers",
    "estimate",
    "lipsdp_bound",
    "split_bound",
    "split_chain",
    "unsupported_reason",
]
