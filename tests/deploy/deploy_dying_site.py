"""A site agent that kills itself (SIGKILL) as soon as it takes a training task.

Usage: python deploy_dying_site.py URL CA SITE STATE_DIR TOKEN_FILE
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from prifed.deploy.agent import AgentOptions, SiteAgent
from prifed.deploy.sitedata import TableSource


def die_on_training(name: str, details: dict[str, Any]) -> None:
    if name == "task" and details.get("kind") == "train":
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    url, ca, site, state_dir, token_file = sys.argv[1:6]
    options = AgentOptions(url, Path(ca), site, Path(state_dir),
                           Path(token_file).read_text().strip(),
                           long_poll_seconds=5, max_offline_seconds=60)
    SiteAgent(options, TableSource(None, None), events=die_on_training).run()
