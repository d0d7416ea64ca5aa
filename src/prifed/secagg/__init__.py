"""Secure aggregation: the coordinator learns the sum of updates, not one update.

Pairwise masking after Bonawitz et al. (CCS 2017) and its sparse-graph
variant SecAgg+ after Bell et al. (CCS 2020), for an honest-but-curious
coordinator. Modules:

- :mod:`~prifed.secagg.config`: settings, the per-round plan, the SecAgg+ graph;
- :mod:`~prifed.secagg.encoding`: fixed point, the no-wrap modulus, bit packing;
- :mod:`~prifed.secagg.crypto`: X25519, HKDF, AES-GCM and the AES-CTR mask;
- :mod:`~prifed.secagg.shamir`: Shamir sharing over GF(2**521 - 1);
- :mod:`~prifed.secagg.client` and :mod:`~prifed.secagg.server`: the site and
  coordinator state machines, exchanging plain messages;
- :mod:`~prifed.secagg.driver`: the backend and an in-process round driver.

The threat model and limits are in docs/secure-aggregation.md.
"""

from prifed.secagg.client import SecAggClient
from prifed.secagg.config import SecAggConfig
from prifed.secagg.driver import SecAggBackend, SecAggRound, run_secagg_round
from prifed.secagg.encoding import FixedPoint
from prifed.secagg.server import SecAggServer

__all__ = ["FixedPoint", "SecAggBackend", "SecAggClient", "SecAggConfig",
           "SecAggRound", "SecAggServer", "run_secagg_round"]
