"""Real processes on 127.0.0.1 for the deployment tests: coordinator, sites, proxy.

Every process is started here and stopped by its own pid; every server
listens on 127.0.0.1 only, on a port picked free by the kernel.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prifed.core.params import params_from_bytes
from prifed.deploy.agent import AgentOptions, SiteAgent
from prifed.deploy.config import FederationConfig, load_config
from prifed.deploy.pki import init_pki, new_join_token, token_digest
from prifed.deploy.sitedata import TableSource
from prifed.deploy.store import Store

HEART_SITES = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
                   "http_proxy", "https_proxy", "all_proxy", "no_proxy")
START_TIMEOUT = 90.0


def free_port() -> int:
    """Return a port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a child process: no proxies, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1"})
    env.update(extra or {})
    return env


def wait_until(condition: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns a true value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def stop(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
         timeout: float = 15.0) -> None:
    """Stop one process by its pid, killing it if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout)


def config_text(sites: Iterable[str], port: int, rounds: int = 2,
                local_steps: int = 20, lr: float = 0.01, deadline: float = 60.0,
                min_sites: int = 1, attempts: int = 3, extra: str = "",
                limits: str = "", keep_updates: bool = False,
                evaluate_deadline: float = 30.0, model: str = "logreg") -> str:
    """Write a federation config for the heart data."""
    roster = ", ".join(json.dumps(s) for s in sites)
    return f"""
[federation]
name = "test-fed"
sites = [{roster}]
seed = 42

[training]
model = "{model}"
rounds = {rounds}
local_steps = {local_steps}
lr = {lr}
{extra}

[rounds]
deadline_seconds = {deadline}
min_sites = {min_sites}
attempts = {attempts}
evaluate_deadline_seconds = {evaluate_deadline}
setup_deadline_seconds = 120

[coordinator]
host = "127.0.0.1"
port = {port}
linger_seconds = 20
long_poll_seconds = 5
keep_updates = {str(keep_updates).lower()}

[limits]
{limits}
"""


@dataclass
class Federation:
    """A federation folder with its PKI, tokens, coordinator and site processes."""

    root: Path
    sites: list[str]
    port: int
    config: FederationConfig
    tokens: dict[str, str]
    coordinator: subprocess.Popen[bytes] | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path, sites: list[str] | None = None,
               **settings: Any) -> Federation:
        """Write the config, create the PKI and one join token per site."""
        sites = list(sites or HEART_SITES)
        port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        (root / "federation.toml").write_text(config_text(sites, port, **settings))
        config = load_config(root / "federation.toml")
        init_pki(config.pki_dir, config.federation.name, ["localhost"], ["127.0.0.1"])
        store = Store(config.database_url, config.state_dir)
        store.sync_roster(sites)
        tokens = {}
        for site in sites:
            tokens[site] = new_join_token()
            store.add_token(site, token_digest(tokens[site]), 3600)
        store.close()
        return cls(root, sites, port, config, tokens)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.config.pki_dir / "ca.pem"

    @property
    def state_dir(self) -> Path:
        return self.config.state_dir

    @property
    def log_file(self) -> Path:
        return self.state_dir / "coordinator.log"

    def _spawn(self, args: list[str], name: str,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        output = open(self.root / f"{name}.out", "ab")
        self.logs.append(output)
        process = subprocess.Popen([sys.executable, "-m", "prifed.cli", *args],
                                   stdout=output, stderr=subprocess.STDOUT,
                                   env=child_env(env), cwd=self.root)
        self.processes.append(process)
        return process

    def start_coordinator(self) -> subprocess.Popen[bytes]:
        """Start the coordinator and wait until it listens."""
        ready = self.state_dir / "coordinator.json"
        ready.unlink(missing_ok=True)
        self.coordinator = self._spawn(
            ["coordinator", "--config", str(self.root / "federation.toml"),
             "--port", str(self.port), "--verbose"], "coordinator")

        def listening() -> bool:
            if self.coordinator is not None and self.coordinator.poll() is not None:
                raise AssertionError("coordinator exited early:\n"
                                     + self.output("coordinator")[-3000:])
            return ready.exists()

        wait_until(listening, START_TIMEOUT, "the coordinator to listen")
        return self.coordinator

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / site.replace(" ", "_")

    def token_file(self, site: str) -> Path:
        path = self.root / f"token-{site.replace(' ', '_')}"
        path.write_text(self.tokens[site])
        return path

    def start_site(self, site: str, extra_args: list[str] | None = None,
                   env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a real site agent process for ``site``."""
        args = ["site", "--coordinator", self.url, "--ca", str(self.ca_file),
                "--name", site, "--state-dir", str(self.site_dir(site)),
                "--token-file", str(self.token_file(site)), "--max-offline", "90",
                "--long-poll", "5", "--verbose", *(extra_args or [])]
        return self._spawn(args, f"site-{site.replace(' ', '_')}", env)

    def agent(self, site: str, events: Callable[[str, dict[str, Any]], None]
              | None = None, chunk_bytes: int = 1024 * 1024) -> SiteAgent:
        """Return an in-process site agent for ``site`` (the test drives it)."""
        options = AgentOptions(self.url, self.ca_file, site, self.site_dir(site),
                               self.tokens[site], chunk_bytes=chunk_bytes,
                               long_poll_seconds=2.0, max_offline_seconds=90)
        return SiteAgent(options, TableSource(None, None), events=events)

    def output(self, name: str) -> str:
        path = self.root / f"{name}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_coordinator(self, timeout: float = 240.0) -> int:
        """Wait for the coordinator to finish its run and exit."""
        assert self.coordinator is not None
        try:
            return self.coordinator.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("coordinator did not finish:\n"
                                 + self.output("coordinator")[-4000:]) from None

    def final_model(self) -> dict[str, np.ndarray]:
        return params_from_bytes((self.state_dir / "final_model.safetensors")
                                 .read_bytes())

    def store(self) -> Store:
        return Store(self.config.database_url, self.state_dir)

    def close(self) -> None:
        """Stop every process this federation started, by pid."""
        for process in reversed(self.processes):
            stop(process)
        for handle in self.logs:
            handle.close()


def he_federation(root: Path, **settings: Any) -> Federation:
    """Create a federation with CKKS: key files in ``root`` and the config section.

    Sites take ``--he-key <root>/site.ctx``; the coordinator's context file
    has no secret key.
    """
    from prifed.he.keys import coordinator_context_bytes, create_federation_key, \
        site_context_bytes, write_key_file
    from prifed.he.params import select_params

    root.mkdir(parents=True, exist_ok=True)
    key = create_federation_key(select_params(4, 1.0, 1e-6, 1000.0), run="test")
    write_key_file(root / "site.ctx", site_context_bytes(key))
    write_key_file(root / "coordinator.ctx", coordinator_context_bytes(key))
    return Federation.create(root, limits='\n[homomorphic]\ncoordinator_key = '
                                          '"coordinator.ctx"\n', **settings)


def start_proxy(fed: Federation) -> tuple[subprocess.Popen[bytes], int, Path]:
    """Start the CONNECT proxy of ``deploy_proxy.py``; return it, its port, its log.

    The federation stops the proxy with its other processes.
    """
    port = free_port()
    log = fed.root / "proxy.jsonl"
    errors = open(fed.root / "proxy.err", "ab")
    fed.logs.append(errors)
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("deploy_proxy.py")), str(port),
         str(log)], env=child_env(), stdout=subprocess.DEVNULL, stderr=errors)
    fed.processes.append(process)
    wait_until(lambda: log.exists(), 30, "the proxy to listen")
    return process, port, log
