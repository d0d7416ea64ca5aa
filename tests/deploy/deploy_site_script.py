"""Site agents as real processes with a twist, for the fault tests.

Usage: python deploy_site_script.py MODE URL CA SITE STATE_DIR TOKEN_FILE [GATE]

- ``die``: run the agent and kill the process (SIGKILL) as soon as it takes a
  training task.
- ``gated``: import and warm up everything, wait until the file GATE exists,
  then run the agent as ``prifed site`` would. This lets a test restart a site
  at an exact moment without waiting for Python and torch to load.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from prifed.deploy.agent import AgentOptions, SiteAgent, warm_up_torch
from prifed.deploy.sitedata import TableSource


def die_on_training(name: str, details: dict[str, Any]) -> None:
    if name == "task" and details.get("kind") == "train":
        os.kill(os.getpid(), signal.SIGKILL)


def main(mode: str, url: str, ca: str, site: str, state_dir: str, token_file: str,
         gate: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = Path(token_file).read_text().strip()
    options = AgentOptions(url, Path(ca), site, Path(state_dir), token,
                           long_poll_seconds=5, max_offline_seconds=60)
    if mode == "die":
        SiteAgent(options, TableSource(None, None), events=die_on_training).run()
        return
    assert gate is not None
    warm_up_torch().join()
    while not Path(gate).exists():
        time.sleep(0.02)
    SiteAgent(options, TableSource(None, None)).run()


if __name__ == "__main__":
    main(*sys.argv[1:])
