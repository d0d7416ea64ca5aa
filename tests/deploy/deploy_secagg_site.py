"""A site agent process that dies (SIGKILL) when a secure-aggregation phase opens.

Usage: python deploy_secagg_site.py PHASE URL CA SITE STATE_DIR TOKEN_FILE

The agent runs as ``prifed site`` would, and kills its own process as soon as
it takes the exchange task of protocol phase PHASE (such as ``masked_input``),
so it has shared its keys but sends nothing more.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from prifed.deploy.agent import AgentOptions, SiteAgent
from prifed.deploy.secure import PHASE_CHANNEL
from prifed.deploy.sitedata import TableSource


def main(phase: str, url: str, ca: str, site: str, state_dir: str,
         token_file: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def die_at_phase(name: str, details: dict[str, Any]) -> None:
        if (name == "task" and details.get("channel") == PHASE_CHANNEL
                and str(details.get("exchange", "")).endswith(f"-{phase}")):
            os.kill(os.getpid(), signal.SIGKILL)

    token = Path(token_file).read_text().strip()
    options = AgentOptions(url, Path(ca), site, Path(state_dir), token,
                           long_poll_seconds=5, max_offline_seconds=60)
    SiteAgent(options, TableSource(None, None), events=die_at_phase).run()


if __name__ == "__main__":
    main(*sys.argv[1:])
