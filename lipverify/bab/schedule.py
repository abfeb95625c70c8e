"""One input's whole branch and bound: a plain search, then, for what it leaves open, tightened
root bounds (`lipverify.bab.tighten`) and the search again.

What a plain search decides within `after` seconds pays nothing for the tightening; an input it
leaves open spends `tighten` of the time left proving deep neurons stable, and the rest
searching over the tighter root. Both searches' proofs are over the same region, so the better
of their proven margins holds.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from lipverify.bab.pool import Terms
from lipverify.bab.relaxed import InputSet
from lipverify.bab.search import Leaf, Outcome, Search, SearchOptions
from lipverify.bab.tighten import TightenOptions, tighten_root
from lipverify.bounds.chain import Chain
from lipverify.types import Status, deadline_passed

log = logging.getLogger(__name__)


def solve(chain: Chain, inputs: InputSet, terms: Terms, slack: float, options: SearchOptions,
          leaf: Leaf | None = None, deadline: float | None = None, tighten: float = 0.0,
          after: float = 10.0) -> Outcome:
    """Branch and bound of `terms` on `chain` over `inputs`; `tighten` > 0: the share of the
    time left, after `after` seconds of plain search (0: tighten first), spent tightening."""
    if tighten <= 0:
        return Search(chain, inputs, terms, slack, options, leaf, deadline).run()
    first = None
    if after > 0:
        until = time.monotonic() + after
        first = Search(chain, inputs, terms, slack, options, leaf,
                       until if deadline is None else min(until, deadline)).run()
        if first.status is not Status.TIMEOUT or deadline_passed(deadline):
            return first
    start = time.monotonic()
    tight = tighten_root(chain, inputs, options.interm_steps, options,
                         TightenOptions(share=tighten), deadline)
    log.debug("bab tighten: unstable %s, tried %s, proven %s, %.1f s", tight.unstable,
              tight.tried, tight.proven, time.monotonic() - start)
    out = Search(chain, inputs, terms, slack, options, leaf, deadline, tight.root).run()
    if first is None:
        return out
    return dataclasses.replace(out, margin=max(out.margin, first.margin),
                               domains=out.domains + first.domains,
                               seconds=out.seconds + first.seconds)
