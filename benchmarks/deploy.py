"""Benchmarks of the deployed federation on 127.0.0.1 (prints figures, asserts nothing).

    python benchmarks/deploy.py heart    # four-site heart job: deployed vs simulated
    python benchmarks/deploy.py ingest   # 100 sites upload a 1M-float update each
    python benchmarks/deploy.py async    # one slow site: FedAvg rounds vs FedBuff
    python benchmarks/deploy.py all

``heart`` runs ``prifed simulate --no-baselines`` and the same job deployed,
as a coordinator and four ``prifed site`` processes over HTTPS on loopback.
It checks that both final models are identical and splits the deployed wall
time into process start, setup, rounds (site compute against the rest) and
shutdown.

``ingest`` starts a coordinator whose model has ``--params`` float32 values
and lets ``--sites`` signed clients (threads in this process, no training)
upload one update each in the same round, all released at once. It reports
updates per second, the coordinator's peak memory against its memory before
the uploads, and p50/p99 latency of a whole upload and of its requests.

``async`` deploys the heart job twice with the same budget of site tasks
(``--rounds`` per site), once as synchronous FedAvg rounds and once as
asynchronous FedBuff, while Cleveland waits ``--slow-seconds`` before every
training task (a site ten or more times slower than the others). The four
agents run as threads of this process against a coordinator process. It
reports wall time, final mean accuracy, the training time until the mean
accuracy over the sites first reached 0.7, 0.75 and 0.8 (at the end of the
round, or when the FedBuff version was made), and how many updates each
site gave.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEART_SITES = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                   "https_proxy", "all_proxy")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def prifed(*args: str) -> list[str]:
    return [sys.executable, "-m", "prifed.cli", *args]


def federation_folder(root: Path, sites: list[str], rounds: int,
                      extra: str = "", training: str = "",
                      min_sites: int | None = None) -> Path:
    """Write a federation config, its PKI and one join token file per site.

    ``training`` adds lines to the ``[training]`` section and ``extra`` to
    the end; ``min_sites`` defaults to every site.
    """
    from prifed.deploy.config import load_config
    from prifed.deploy.pki import init_pki, new_join_token, token_digest
    from prifed.deploy.store import Store

    roster = ", ".join(json.dumps(s) for s in sites)
    root.mkdir(parents=True, exist_ok=True)
    (root / "federation.toml").write_text(f"""
[federation]
name = "bench"
sites = [{roster}]
seed = 42

[training]
rounds = {rounds}
{training}

[rounds]
deadline_seconds = 600
min_sites = {len(sites) if min_sites is None else min_sites}
evaluate_deadline_seconds = 300

[coordinator]
port = 0
linger_seconds = 30
{extra}
""")
    config = load_config(root / "federation.toml")
    init_pki(config.pki_dir, "bench", ["localhost"], ["127.0.0.1"])
    store = Store(config.database_url, config.state_dir)
    store.sync_roster(sites)
    for site in sites:
        token = new_join_token()
        store.add_token(site, token_digest(token), 3600)
        (root / f"token-{sites.index(site):03d}").write_text(token)
    store.close()
    return root / "federation.toml"


def start_coordinator(config: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``prifed coordinator`` in the config's folder; return it and its port."""
    folder = config.parent
    process = subprocess.Popen(prifed("coordinator", "--config", str(config)),
                               env=child_env(), cwd=folder,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(folder / "state" / "coordinator.json")
    return process, json.loads((folder / "state" / "coordinator.json")
                               .read_text())["port"]


def wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def log_times(path: Path) -> list[tuple[float, str]]:
    """Return (unix time, line) for every line of a coordinator log."""
    lines = []
    for line in path.read_text().splitlines():
        match = _STAMP.match(line)
        if match:
            stamp = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            lines.append((stamp.timestamp(), line))
    return lines


def first_time(lines: list[tuple[float, str]], text: str) -> float:
    return next(t for t, line in lines if text in line)


# The heart job.


def heart(rounds: int, threads: int) -> dict[str, Any]:
    from prifed.core.params import params_from_bytes

    work = Path(tempfile.mkdtemp(prefix="prifed-bench-heart-"))
    started = time.perf_counter()
    subprocess.run(prifed("simulate", "--no-baselines", "--rounds", str(rounds),
                          "--out", str(work / "simulated")), check=True,
                   env=child_env(), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, cwd=work)
    simulated_seconds = time.perf_counter() - started
    simulated_summary = json.loads((work / "simulated" / "summary.json").read_text())

    config = federation_folder(work / "deployed", HEART_SITES, rounds)
    folder = config.parent
    started = time.perf_counter()
    wall_start = time.time()
    coordinator, port = start_coordinator(config)
    sites = []
    for i, site in enumerate(HEART_SITES):
        output = open(folder / f"site-{i}.out", "wb")
        sites.append(subprocess.Popen(
            prifed("site", "--coordinator", f"https://127.0.0.1:{port}", "--ca",
                   str(folder / "pki" / "ca.pem"), "--name", site, "--state-dir",
                   str(folder / "sites" / str(i)), "--token-file",
                   str(folder / f"token-{i:03d}"), "--threads", str(threads)),
            env=child_env(), cwd=folder, stdout=output, stderr=subprocess.STDOUT))
        output.close()
    codes = [process.wait() for process in sites]
    if any(codes):
        coordinator.terminate()
        raise RuntimeError(f"site agents exited with {codes}; see {folder}/site-*.out")
    coordinator.wait()
    deployed_seconds = time.perf_counter() - started

    simulated_model = params_from_bytes(
        (work / "simulated" / "model.safetensors").read_bytes())
    deployed_model = params_from_bytes(
        (folder / "state" / "final_model.safetensors").read_bytes())
    identical = all(np.array_equal(simulated_model[k], deployed_model[k])
                    for k in simulated_model)
    lines = log_times(folder / "state" / "coordinator.log")
    summary = json.loads((folder / "state" / "summary.json").read_text())
    records = summary["rounds"]
    round_seconds = sum(r["seconds"] for r in records)
    train = sum(max(m["train_seconds"] for m in r["train_metrics"].values())
                for r in records)
    evaluate = sum(max(m["eval_seconds"] for m in r["eval_metrics"].values())
                   for r in records)
    listening = first_time(lines, "coordinator: listening")
    setup_done = first_time(lines, "setup: merged statistics")
    done = first_time(lines, "done: final model written")
    return {
        "rounds": rounds, "site_threads": threads,
        "simulated_process_seconds": simulated_seconds,
        "simulated_engine_seconds": simulated_summary["methods"]["fedavg"]["seconds"],
        "deployed_process_seconds": deployed_seconds,
        "ratio": deployed_seconds / simulated_seconds,
        "identical_final_model": identical,
        "breakdown": {
            "coordinator start": listening - wall_start,
            "sites start, join, statistics": setup_done - listening,
            "rounds": round_seconds,
            "  of which slowest site training": train,
            "  of which slowest site evaluation": evaluate,
            "  of which protocol and waiting": round_seconds - train - evaluate,
            "final model, sites fetch it, exit": wall_start + deployed_seconds - done,
        },
        "per_round_seconds": [round(r["seconds"], 3) for r in records],
    }


def print_heart(result: dict[str, Any]) -> None:
    print(f"heart job, {result['rounds']} rounds, 4 sites, 100 local steps, "
          f"{result['site_threads']} torch thread(s) per site")
    simulated = result["simulated_process_seconds"]
    deployed = result["deployed_process_seconds"]
    print(f"  simulated (whole process):      {simulated:7.2f} s"
          f"  (engine alone {result['simulated_engine_seconds']:.2f} s)")
    print(f"  deployed on loopback (whole):   {deployed:7.2f} s"
          f"  ratio {result['ratio']:.2f}x")
    print(f"  final models identical:         {result['identical_final_model']}")
    for name, seconds in result["breakdown"].items():
        print(f"    {name:38s} {seconds:7.2f} s")
    print(f"  seconds per round: {result['per_round_seconds']}")


# Coordinator ingest.


def run_ingest_coordinator(config_path: str, num_params: int) -> None:
    """Serve a coordinator whose model is one float32 matrix of ``num_params``."""
    from prifed.deploy.cli import configure_service_logging
    from prifed.deploy.config import load_config
    from prifed.deploy.coordinator import Coordinator

    config = load_config(Path(config_path))
    configure_service_logging(config.state_dir / "coordinator.log", False)
    rows = num_params // 1000
    initial = {"dense.weight": np.random.default_rng(0).standard_normal(
        (rows, 1000)).astype(np.float32)}
    sys.exit(Coordinator(config, initial_model=initial).serve())


class MemoryWatch(threading.Thread):
    """Samples a process's resident memory every 20 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.running = True

    def _field(self, name: str) -> int | None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(rf"{name}:\s+(\d+) kB", text)
        return None if match is None else int(match.group(1)) * 1024

    def rss(self) -> int:
        return self._field("VmRSS") or 0

    def peak(self) -> int:
        sampled = max((s for _, s in self.samples), default=0)
        return max(self._field("VmHWM") or 0, sampled)

    def run(self) -> None:
        while self.running:
            self.samples.append((time.monotonic(), self.rss()))
            time.sleep(0.02)


class LoadSite(threading.Thread):
    """A signed client that joins, uploads one update when released, evaluates."""

    def __init__(self, index: int, folder: Path, url: str, num_params: int,
                 chunk_bytes: int, barrier: threading.Barrier) -> None:
        super().__init__(daemon=True)
        self.index = index
        self.folder = folder
        self.url = url
        self.num_params = num_params
        self.chunk_bytes = chunk_bytes
        self.barrier = barrier
        self.site = f"site-{index:03d}"
        self.request_seconds: list[float] = []
        self.upload_seconds = 0.0
        self.finished_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:  # reported by the benchmark
            self.error = error
            self.barrier.abort()

    def _run(self) -> None:
        from prifed.deploy import auth, wire
        from prifed.deploy.agent import AgentOptions, CoordinatorClient
        from prifed.deploy.pki import generate_site_key, public_key_bytes

        options = AgentOptions(self.url, self.folder / "pki" / "ca.pem", self.site,
                               self.folder / "sites" / self.site,
                               long_poll_seconds=5, request_timeout=300)
        key = generate_site_key()
        client = CoordinatorClient(options, "bench", key, lambda *_: None)
        token = (self.folder / f"token-{self.index:03d}").read_text()
        client.json("POST", "/v1/join", {"site": self.site, "token": token,
                                         "public_key": base64.b64encode(
                                             public_key_bytes(key)).decode()})
        task = self._next(client, "train")
        rng = np.random.default_rng(self.index)
        update = {"dense.weight": rng.standard_normal(
            (self.num_params // 1000, 1000)).astype(np.float32)}
        payload = wire.encode_update(update, {}, self.site, int(task["round"]))
        del update
        self.barrier.wait()
        started = time.perf_counter()
        status = self._timed(client.json, "POST", "/v1/rounds/1/uploads", {
            "size": len(payload), "sha256": auth.sha256_hex(payload),
            "num_samples": 100 + self.index, "metrics": {}})
        offset = int(status["offset"])
        while offset < len(payload):
            chunk = payload[offset:offset + self.chunk_bytes]
            target = f"/v1/uploads/{status['upload']}"
            reply = self._timed(client.request, "PUT", target, chunk,
                                headers={"Upload-Offset": str(offset)},
                                content_type="application/octet-stream").json()
            offset = int(reply["offset"])
        self._timed(client.json, "POST", f"/v1/uploads/{status['upload']}/commit", {})
        self.upload_seconds = time.perf_counter() - started
        self.finished_at = time.perf_counter()
        del payload
        task = self._next(client, "evaluate")
        client.json("POST", f"/v1/rounds/{task['round']}/evaluation",
                    {"num_samples": 1, "metrics": {"accuracy": 0.5}})
        self._next(client, "done")
        client.close()

    def _timed(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = call(*args, **kwargs)
        self.request_seconds.append(time.perf_counter() - started)
        return result

    @staticmethod
    def _next(client: Any, kind: str) -> dict[str, Any]:
        while True:
            response = client.request("GET", "/v1/tasks/next", params={"wait": 5})
            if response.status_code == 200 and response.json()["kind"] == kind:
                return response.json()


def ingest(num_sites: int, num_params: int, chunk_bytes: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="prifed-bench-ingest-"))
    sites = [f"site-{i:03d}" for i in range(num_sites)]
    config = federation_folder(work, sites, 1, "\n[limits]\nmax_update_bytes = "
                               f"{64 * 1024 * 1024}\nmax_chunk_bytes = "
                               f"{16 * 1024 * 1024}\n")
    coordinator = subprocess.Popen(
        [sys.executable, __file__, "_coordinator", str(config), str(num_params)],
        env=child_env(), cwd=work, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    wait_for(work / "state" / "coordinator.json")
    port = json.loads((work / "state" / "coordinator.json").read_text())["port"]
    watch = MemoryWatch(coordinator.pid)
    watch.start()
    barrier = threading.Barrier(num_sites + 1)
    clients = [LoadSite(i, work, f"https://127.0.0.1:{port}", num_params,
                        chunk_bytes, barrier) for i in range(num_sites)]
    for client in clients:
        client.start()
    barrier.wait(timeout=600)
    before = watch.rss()
    released = time.perf_counter()
    for client in clients:
        client.join(600)
    errors = [c.error for c in clients if c.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} load clients failed: {errors[0]!r}")
    peak = watch.peak()
    coordinator.wait(120)
    watch.running = False
    lines = log_times(work / "state" / "coordinator.log")
    aggregated = first_time(lines, "fit round 1/1: aggregated")
    accepted_times = [t for t, line in lines if "accepted update from" in line]
    last_commit = max(c.finished_at for c in clients)
    uploads = np.array([c.upload_seconds for c in clients])
    requests = np.array([s for c in clients for s in c.request_seconds])
    update_bytes = 4 * num_params
    timeline = [(round(t - released, 1), round(rss / 2**20))
                for t, rss in watch.samples[::25] if t >= released - 1]
    return {
        "memory_timeline_mb": timeline,
        "sites": num_sites, "params": num_params, "chunk_bytes": chunk_bytes,
        "updates_per_second": num_sites / (last_commit - released),
        "ingest_seconds": last_commit - released,
        "aggregation_done_after_last_accept_seconds": aggregated - max(accepted_times),
        "memory_before_uploads_mb": before / 2**20,
        "memory_peak_mb": peak / 2**20,
        "memory_growth_mb": (peak - before) / 2**20,
        "all_updates_mb": num_sites * update_bytes / 2**20,
        "upload_p50_seconds": float(np.percentile(uploads, 50)),
        "upload_p99_seconds": float(np.percentile(uploads, 99)),
        "request_p50_seconds": float(np.percentile(requests, 50)),
        "request_p99_seconds": float(np.percentile(requests, 99)),
        "requests": int(requests.size),
    }


def print_ingest(result: dict[str, Any]) -> None:
    print(f"coordinator ingest: {result['sites']} sites x {result['params']:,} "
          f"float32 ({result['params'] * 4 / 2**20:.1f} MiB each), chunks of "
          f"{result['chunk_bytes'] // 1024} KiB")
    print(f"  updates per second:            {result['updates_per_second']:8.1f}"
          f"  ({result['ingest_seconds']:.2f} s for all)")
    print(f"  round aggregated after last:   "
          f"{result['aggregation_done_after_last_accept_seconds']:8.2f} s")
    print(f"  coordinator memory before:     {result['memory_before_uploads_mb']:8.1f}"
          " MiB")
    print(f"  coordinator memory peak:       {result['memory_peak_mb']:8.1f} MiB "
          f"(+{result['memory_growth_mb']:.1f}; all updates together would be "
          f"{result['all_updates_mb']:.0f} MiB)")
    print(f"  upload latency p50 / p99:      {result['upload_p50_seconds']:8.2f} / "
          f"{result['upload_p99_seconds']:.2f} s")
    print(f"  request latency p50 / p99:     {result['request_p50_seconds']:8.3f} / "
          f"{result['request_p99_seconds']:.3f} s over {result['requests']} requests")


# One slow site: synchronous rounds against asynchronous tasks.


def run_agents(folder: Path, port: int, slow: str, slow_seconds: float) -> None:
    """Run the four heart sites as agent threads; ``slow`` waits before training."""
    from prifed.deploy.agent import AgentOptions, SiteAgent
    from prifed.deploy.sitedata import TableSource

    def hook(name: str, details: dict[str, Any]) -> None:
        if name == "task" and details.get("kind") == "train":
            time.sleep(slow_seconds)

    threads = []
    for i, site in enumerate(HEART_SITES):
        options = AgentOptions(f"https://127.0.0.1:{port}", folder / "pki" / "ca.pem",
                               site, folder / "sites" / str(i),
                               (folder / f"token-{i:03d}").read_text(),
                               long_poll_seconds=5.0)
        agent = SiteAgent(options, TableSource(None, None),
                          events=hook if site == slow else None)
        threads.append(threading.Thread(target=agent.run, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def slow_site_run(strategy: str, rounds: int, slow_seconds: float) -> dict[str, Any]:
    extra = "" if strategy == "fedavg" else \
        'strategy = "fedbuff"\nstrategy_options = { buffer_size = 2 }'
    work = Path(tempfile.mkdtemp(prefix=f"prifed-bench-{strategy}-"))
    config = federation_folder(work, HEART_SITES, rounds, training=extra,
                               min_sites=1)

    started = time.perf_counter()
    coordinator, port = start_coordinator(config)
    run_agents(work, port, "Cleveland", slow_seconds)
    coordinator.wait()
    seconds = time.perf_counter() - started
    summary = json.loads((work / "state" / "summary.json").read_text())
    lines = log_times(work / "state" / "coordinator.log")
    training = first_time(lines, "setup: merged statistics")
    done = first_time(lines, "done: final model written")
    curve = []
    elapsed = 0.0
    for record in summary["rounds"]:
        elapsed = record["seconds"] if strategy == "fedbuff" else \
            elapsed + record["seconds"]
        accuracy = [m["accuracy"] for m in record["eval_metrics"].values()
                    if m.get("accuracy") is not None]
        if accuracy and not record.get("final"):
            curve.append((elapsed, float(np.mean(accuracy))))
    counts: dict[str, int] = dict.fromkeys(HEART_SITES, 0)
    for record in summary["rounds"]:
        sites = [u["site"] for u in record.get("updates", [])] \
            if strategy == "fedbuff" else record["accepted"]
        for site in sites:
            counts[site] += 1
    return {"strategy": strategy, "process_seconds": seconds,
            "training_seconds": done - training,
            "mean_accuracy": summary["final"]["mean_accuracy"],
            "seconds_to": {str(t): next((e for e, a in curve if a >= t), None)
                           for t in TARGETS},
            "updates_per_site": counts}


TARGETS = (0.7, 0.75, 0.8)
"""Mean accuracies whose first time of reaching the benchmark reports."""


def slow_site(rounds: int, slow_seconds: float) -> dict[str, Any]:
    return {"rounds": rounds, "slow_seconds": slow_seconds,
            "runs": [slow_site_run(s, rounds, slow_seconds)
                     for s in ("fedavg", "fedbuff")]}


def print_slow_site(result: dict[str, Any]) -> None:
    print(f"heart job, {result['rounds']} tasks per site, Cleveland waits "
          f"{result['slow_seconds']:g} s before each training task")
    runs = result["runs"]
    for run in runs:
        counts = ", ".join(f"{k} {v}" for k, v in run["updates_per_site"].items())
        print(f"  {run['strategy']:8s} training {run['training_seconds']:6.2f} s "
              f"(whole {run['process_seconds']:6.2f} s), mean accuracy "
              f"{run['mean_accuracy']:.3f}; updates used: {counts}")
        reached = ", ".join(f"{t}: " + ("never" if v is None else f"{v:.2f} s")
                            for t, v in run["seconds_to"].items())
        print(f"           time to mean accuracy {reached}")
    ratio = runs[0]["training_seconds"] / runs[1]["training_seconds"]
    print(f"  FedBuff trains {ratio:.1f}x faster than FedAvg rounds")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_coordinator":
        run_ingest_coordinator(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", choices=["heart", "ingest", "async", "all"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--site-threads", type=int, default=1,
                        help="torch threads per site agent (four share the CPUs)")
    parser.add_argument("--slow-seconds", type=float, default=1.0,
                        help="async: Cleveland's wait before each training task")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = {}
    if args.which in ("heart", "all"):
        results["heart"] = heart(args.rounds, args.site_threads)
        print_heart(results["heart"])
    if args.which in ("ingest", "all"):
        results["ingest"] = ingest(args.sites, args.params, args.chunk_kib * 1024)
        print_ingest(results["ingest"])
    if args.which in ("async", "all"):
        results["async"] = slow_site(args.rounds, args.slow_seconds)
        print_slow_site(results["async"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
