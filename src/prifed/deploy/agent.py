"""The site agent: outbound HTTPS only, long polling, resumable compressed uploads.

The agent runs beside a site's data and never listens on a port. It requests
work from the coordinator with long polls, each of which returns when a task
is posted, does the task locally and sends the result back. It goes through
an HTTP proxy named in ``HTTPS_PROXY``/``HTTP_PROXY`` (and honours
``NO_PROXY``), because httpx reads those variables.

State in the site's folder survives restarts: the Ed25519 key, the
federation it joined, the trainer's shuffled stream and an update that was
trained but not yet accepted. A restarted agent resends that update instead
of training again, so its batches stay those of an uninterrupted run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from prifed.core.messages import TrainInstruction
from prifed.core.params import ParameterSet, params_from_bytes, params_to_bytes
from prifed.deploy import auth, wire
from prifed.deploy.errors import CoordinatorError
from prifed.deploy.fhirsite import FhirSource
from prifed.deploy.pki import generate_site_key, load_site_key, public_key_bytes, \
    write_private_key
from prifed.deploy.secure import install_site_handlers
from prifed.deploy.sitedata import SiteRows, TableSource, build_client, split_rows, \
    statistics_body
from prifed.deploy.store import write_atomic
from prifed.errors import ConfigError, PriFedError
from prifed.log import get_logger, redact
from prifed.privacy.errors import BudgetExhausted, PolicyError
from prifed.training.client import SiteClient

logger = get_logger(__name__)

EventHook = Callable[[str, dict[str, Any]], None]
"""Called with an event name and its details: progress reporting and tests."""

ExchangeHandler = Callable[[bytes, dict[str, Any]], bytes]
"""Handler of one exchange channel: (decompressed request, task) to reply body."""

def warm_up_torch() -> threading.Thread:
    """Build a throwaway optimiser in the background while the site connects.

    torch's first optimiser takes seconds to create (torch 2.13 imports its
    compiler stack then); doing it early keeps that out of round 1.
    """

    def build() -> None:
        import torch

        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)

    thread = threading.Thread(target=build, name="prifed-warm-up", daemon=True)
    thread.start()
    return thread


PENDING_FILE = "pending-update.safetensors"
CLIENT_STATE_FILE = "client-state.safetensors"

ClientState = tuple[dict[str, Any], dict[str, np.ndarray]]
"""A site client's state between rounds: JSON values and the arrays they name."""


_RETRY_STATUS = {502, 503, 504}
ZSTD_MEDIA_TYPE = "application/zstd"


@dataclass
class AgentOptions:
    """Settings of a site agent: its coordinator, identity, state folder, timing."""

    coordinator: str
    ca_file: Path
    site: str
    state_dir: Path
    token: str | None = None
    chunk_bytes: int = 1024 * 1024
    long_poll_seconds: float = 25.0
    max_offline_seconds: float | None = None
    request_timeout: float = 60.0


class CoordinatorClient:
    """Signed HTTPS requests to the coordinator, retried across outages."""

    def __init__(self, options: AgentOptions, federation: str, key: Any,
                 events: EventHook) -> None:
        if not options.ca_file.is_file():
            raise ConfigError(f"CA certificate not found: {options.ca_file}")
        context = ssl.create_default_context(cafile=str(options.ca_file))
        read_timeout = options.long_poll_seconds + options.request_timeout
        timeout = httpx.Timeout(options.request_timeout, read=read_timeout)
        self.http = httpx.Client(base_url=options.coordinator.rstrip("/"),
                                 verify=context, timeout=timeout, trust_env=True)
        self.options = options
        self.federation = federation
        self.key = key
        self.events = events
        self._jitter = random.Random()

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def request(self, method: str, path: str, body: bytes = b"",
                params: Mapping[str, Any] | None = None,
                headers: Mapping[str, str] | None = None,
                content_type: str | None = None, retry: bool = True,
                key: Any = None) -> httpx.Response:
        """Send one signed request; retry connection failures and proxy errors.

        A 4xx or other error status raises :class:`CoordinatorError` with the
        coordinator's code and detail.
        """
        failures = 0
        first_failure: float | None = None
        while True:
            request = self.http.build_request(method, path, content=body or None,
                                              params=params,
                                              headers=dict(headers or {}))
            if content_type:
                request.headers["Content-Type"] = content_type
            target = request.url.raw_path.decode("latin-1")
            request.headers.update(auth.sign_request(
                key or self.key, self.federation, self.options.site, method, target,
                auth.sha256_hex(body)))
            try:
                response = self.http.send(request)
            except httpx.TransportError as error:
                if _is_tls_failure(error):
                    raise CoordinatorError(0, "tls_error",
                                           f"TLS verification of {self.http.base_url} "
                                           f"failed: {error}") from None
                problem = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 400:
                    return response
                if response.status_code not in _RETRY_STATUS:
                    raise _coordinator_error(response)
                problem = f"HTTP {response.status_code}"
            if not retry:
                raise CoordinatorError(0, "unreachable", problem)
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            limit = self.options.max_offline_seconds
            if limit is not None and now - first_failure > limit:
                raise CoordinatorError(0, "unreachable",
                                       f"coordinator unreachable for over {limit:g} s: "
                                       f"{problem}")
            failures += 1
            # Exponential backoff with jitter, at most 15 s between attempts.
            delay = min(15.0, 0.25 * 2 ** min(failures, 6)) * (
                0.5 + 0.5 * self._jitter.random())
            self.events("retry", {"method": method, "path": path, "problem": problem,
                                  "delay": delay})
            logger.warning("%s %s failed (%s); retrying in %.1f s", method, path,
                           redact(problem), delay)
            time.sleep(delay)

    def json(self, method: str, path: str, value: Any = None,
             **kwargs: Any) -> Any:
        """Send a JSON body (or none) and return the parsed JSON reply."""
        body = b"" if value is None else wire.dumps(value)
        response = self.request(method, path, body,
                                content_type="application/json" if body else None,
                                **kwargs)
        return response.json() if response.content else None


def _coordinator_error(response: httpx.Response) -> CoordinatorError:
    try:
        payload = response.json()
    except ValueError:
        payload = {}
    if not isinstance(payload, dict):
        payload = {}
    code = str(payload.pop("error", "http_error"))
    detail = str(payload.pop("detail", response.text[:200]))
    return CoordinatorError(response.status_code, code, detail, payload)


def _is_tls_failure(error: httpx.TransportError) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(error)


@dataclass
class _Pending:
    """An update trained for a round and not yet accepted or refused."""

    server_round: int
    payload: bytes
    num_samples: int
    metrics: dict[str, float | None]
    client_state: ClientState


@dataclass
class SiteAgent:
    """One site's agent: join once, then take tasks until the run is done."""

    options: AgentOptions
    source: TableSource | FhirSource
    events: EventHook | None = None
    handlers: dict[str, ExchangeHandler] = field(default_factory=dict)
    update_labels: dict[str, str] = field(default_factory=dict)
    """Metadata added to every update, such as the FHIR spec hash."""
    wrap_client: Callable[[SiteClient], Any] | None = None
    """Wraps the site's trainer, such as in an encrypting client; None: as is."""
    client: CoordinatorClient | None = None
    final_model: Path | None = None
    _rows: SiteRows | None = None
    _trainer: Any = None
    _base_client: SiteClient | None = None
    _setup_digest: str | None = None
    _models: dict[int, ParameterSet] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.handlers.setdefault("statistics", self._statistics)
        install_site_handlers(self)

    @property
    def folder(self) -> Path:
        return self.options.state_dir

    def emit(self, name: str, details: dict[str, Any]) -> None:
        """Report an event to the hook, if any."""
        if self.events is not None:
            self.events(name, details)

    # Identity.

    def connect(self) -> None:
        """Load or create the site key, join with the token once, then send hello."""
        self.folder.mkdir(parents=True, exist_ok=True)
        key_path = self.folder / "site.key"
        info_path = self.folder / "site.json"
        if key_path.exists():
            key = load_site_key(key_path)
        else:
            key = generate_site_key()
            write_private_key(key_path, key)
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        if info.get("site") not in (None, self.options.site):
            raise ConfigError(f"state folder {self.folder} belongs to site "
                              f"{info['site']!r}, not {self.options.site!r}")
        federation = info.get("federation") or self._federation_name()
        self.client = CoordinatorClient(self.options, federation, key, self.emit)
        if not info.get("joined"):
            self._join(key, federation, info_path)
        self.client.json("POST", "/v1/hello", {})
        logger.info("site %s: connected to federation %s at %s", self.options.site,
                    federation, self.options.coordinator)
        self.emit("connected", {"federation": federation})

    def _federation_name(self) -> str:
        context = ssl.create_default_context(cafile=str(self.options.ca_file))
        with httpx.Client(base_url=self.options.coordinator.rstrip("/"),
                          verify=context, trust_env=True,
                          timeout=self.options.request_timeout) as http:
            deadline = time.monotonic() + (self.options.max_offline_seconds or 3600)
            while True:
                try:
                    response = http.get("/healthz")
                    response.raise_for_status()
                    return str(response.json()["federation"])
                except httpx.TransportError as error:
                    if _is_tls_failure(error):
                        raise CoordinatorError(0, "tls_error",
                                               f"TLS verification failed: {error}") \
                            from None
                    if time.monotonic() > deadline:
                        raise CoordinatorError(0, "unreachable", str(error)) from None
                    time.sleep(1.0)

    def _join(self, key: Any, federation: str, info_path: Path) -> None:
        if not self.options.token:
            raise ConfigError(f"site {self.options.site!r} has not joined yet; pass "
                              "its join token (--token-file or PRIFED_JOIN_TOKEN)")
        assert self.client is not None
        public = base64.b64encode(public_key_bytes(key)).decode()
        self.client.json("POST", "/v1/join", {"site": self.options.site,
                                              "token": self.options.token,
                                              "public_key": public})
        info = {"site": self.options.site, "federation": federation,
                "coordinator": self.options.coordinator, "joined": True,
                "joined_at": time.time()}
        write_atomic(info_path, json.dumps(info, indent=2).encode())
        logger.info("site %s: joined federation %s", self.options.site, federation)
        self.emit("joined", {"federation": federation})

    # The task loop.

    def run(self) -> Path | None:
        """Connect and take tasks until the coordinator sends the final task."""
        warm_up_torch()
        self.connect()
        try:
            while self.step():
                pass
        finally:
            if self.client is not None:
                self.client.close()
        return self.final_model

    def step(self) -> bool:
        """Wait for one task and do it; return False once the run is done."""
        assert self.client is not None
        response = self.client.request(
            "GET", "/v1/tasks/next", params={"wait": self.options.long_poll_seconds})
        if response.status_code == 204:
            return True
        task = response.json()
        kind = task.get("kind")
        self.emit("task", task)
        if kind == "train":
            self.train(task)
        elif kind == "evaluate":
            self.evaluate(task)
        elif kind == "exchange":
            self.exchange(task)
        elif kind == "done":
            self.finish(task)
            return False
        else:
            raise CoordinatorError(0, "unknown_task",
                                   f"task kind {kind!r} is not supported by this "
                                   "agent; upgrade PriFed at this site")
        return True

    # Exchanges (statistics and extension protocols).

    def exchange(self, task: dict[str, Any]) -> None:
        """Download an exchange request and reply with its channel's handler."""
        assert self.client is not None
        channel = str(task["channel"])
        handler = self.handlers.get(channel)
        if handler is None:
            raise CoordinatorError(0, "unknown_channel",
                                   f"exchange channel {channel!r} has no handler at "
                                   "this site")
        exchange_id = str(task["exchange"])
        try:
            payload = self.client.request("GET", f"/v1/exchanges/{exchange_id}").content
        except CoordinatorError as error:
            if error.code != "unknown_exchange":
                raise
            # The coordinator restarted or closed the exchange after posting it.
            logger.warning("exchange %s: request withdrawn, skipping it: %s",
                           exchange_id, error.detail)
            self.emit("withdrawn", {"exchange": exchange_id, "channel": channel})
            return
        request = wire.decompress(payload, 64 * 1024 * 1024, "exchange request")
        reply = handler(request, task)
        try:
            self.client.request("POST", f"/v1/exchanges/{exchange_id}/reply",
                                wire.compress(reply),
                                content_type=ZSTD_MEDIA_TYPE)
        except CoordinatorError as error:
            if error.code != "exchange_closed":
                raise
            logger.warning("exchange %s: reply not needed any more: %s", exchange_id,
                           error.detail)
        self.emit("exchanged", {"exchange": exchange_id, "channel": channel})

    def _statistics(self, request: bytes, task: dict[str, Any]) -> bytes:
        settings = json.loads(request)
        rows = self.rows()
        frames = split_rows(rows, int(settings["seed"]),
                            float(settings["test_fraction"]))
        logger.info("setup: site %s sends statistics of %d training rows",
                    self.options.site, len(frames.train))
        return wire.dumps(statistics_body(rows, frames))

    def rows(self) -> SiteRows:
        """Return the site's rows, read once."""
        if self._rows is None:
            self._rows = self.source.load(self.options.site)
        return self._rows

    # Training.

    def trainer(self, setup: dict[str, Any]) -> Any:
        """Return the site's trainer for a setup block, restoring its stream."""
        digest = hashlib.sha256(wire.dumps(setup)).hexdigest()
        if self._trainer is None or self._setup_digest != digest:
            client = build_client(self.rows(), setup)
            self._setup_digest = digest
            state = self._saved_client_state()
            if state is not None and state[0].get("setup") == digest:
                restore_client_state(client, state)
            self._base_client = client
            self._trainer = client if self.wrap_client is None \
                else self.wrap_client(client)
        return self._trainer

    def train(self, task: dict[str, Any]) -> None:
        """Train on the round's model, or resend an update trained earlier."""
        server_round = int(task["round"])
        label = str(task.get("label")
                    or f"round {server_round}/{task.get('num_rounds', '?')}")
        trainer = self.trainer(task["setup"])
        pending = self._load_pending()
        if pending is not None and pending.server_round != server_round:
            logger.warning("fit %s: dropping the update of round %d, which the "
                           "coordinator no longer wants", label, pending.server_round)
            self._resolve_pending(pending)
            pending = None
        if pending is None:
            pending = self._fit(task, trainer)
        if pending is None:
            self.emit("refused", {"round": server_round})
            return
        self.emit("trained", {"round": server_round, "bytes": len(pending.payload)})
        try:
            self.upload(server_round, pending)
        except CoordinatorError as error:
            if error.status in (403, 409):
                logger.warning("fit %s: update rejected (%s): %s", label, error.code,
                               error.detail)
                self.emit("rejected", {"round": server_round, "code": error.code,
                                      "detail": error.detail})
                self._resolve_pending(pending)
                return
            if error.status in (413, 422):
                # Sending the same update again would be rejected again, so it
                # is dropped and the coordinator hears why this site has none.
                self._rejected_update(server_round, label, pending, error)
                return
            raise
        self._resolve_pending(pending)
        logger.info("fit %s: update accepted (%d samples, %d bytes)", label,
                    pending.num_samples, len(pending.payload))
        self.emit("accepted", {"round": server_round})

    def _rejected_update(self, server_round: int, label: str, pending: _Pending,
                        error: CoordinatorError) -> None:
        logger.error("fit %s: the coordinator rejected this site's update (%s): %s",
                     label, error.code, error.detail)
        self.emit("rejected", {"round": server_round, "code": error.code,
                              "detail": error.detail})
        self._resolve_pending(pending)
        assert self.client is not None
        reason = redact(f"update rejected ({error.code}): {error.detail}", 400)
        try:
            self.client.json("POST", f"/v1/rounds/{server_round}/failure",
                             {"reason": reason})
        except CoordinatorError as failure:
            logger.warning("fit %s: could not report the rejection: %s", label,
                           failure.detail)

    def _fit(self, task: dict[str, Any], trainer: Any) -> _Pending | None:
        assert self.client is not None
        server_round = int(task["round"])
        params = self.model(int(task["model_version"]))
        extra: ParameterSet = {}
        if task.get("extra"):
            payload = self.client.request("GET",
                                          f"/v1/rounds/{server_round}/extra").content
            extra, _ = wire.decode_tensors(payload, 1 << 30, "extra tensors")
        instruction = TrainInstruction(self.options.site, server_round,
                                       dict(task.get("config") or {}), extra)
        try:
            reply = trainer.fit(params, instruction)
        except (PriFedError, ValueError, RuntimeError) as error:
            reason = redact(f"{type(error).__name__}: {error}")
            self.client.json("POST", f"/v1/rounds/{server_round}/failure",
                             {"reason": reason})
            if isinstance(error, (PolicyError, BudgetExhausted)):
                # The site's privacy policy rejects this round, and the agent goes on.
                return None
            raise
        payload = wire.encode_update(reply.params, reply.extra, self.options.site,
                                     server_round, self.update_labels)
        pending = _Pending(server_round, payload, int(reply.num_samples),
                           wire.to_json(reply.metrics),
                           client_state(self._base_client or trainer,
                                        self._setup_digest or ""))
        self._save_pending(pending)
        return pending

    def upload(self, server_round: int, pending: _Pending) -> None:
        """Upload an update in chunks, resuming from the coordinator's offset."""
        assert self.client is not None
        size = len(pending.payload)
        declaration = {"size": size, "sha256": auth.sha256_hex(pending.payload),
                       "num_samples": pending.num_samples, "metrics": pending.metrics}
        status = self.client.json("POST", f"/v1/rounds/{server_round}/uploads",
                                  declaration)
        if status["status"] == "accepted":
            return
        upload_id, offset = str(status["upload"]), int(status["offset"])
        if offset:
            self.emit("resume", {"round": server_round, "offset": offset,
                                 "size": size})
            logger.info("fit round %d: resuming upload at byte %d of %d",
                        server_round, offset, size)
        while offset < size:
            chunk = pending.payload[offset:offset + self.options.chunk_bytes]
            self.emit("chunk", {"round": server_round, "offset": offset,
                                "size": len(chunk)})
            try:
                result = self._put_chunk(upload_id, offset, chunk)
            except CoordinatorError as error:
                if error.code == "offset_mismatch":
                    offset = int(error.fields.get("offset", 0))
                    continue
                if error.code == "unreachable":
                    offset = self._resume_offset(server_round, upload_id, offset)
                    continue
                raise
            offset = int(result["offset"])
        commit = self.client.json("POST", f"/v1/uploads/{upload_id}/commit", {})
        if commit.get("status") != "accepted":
            raise CoordinatorError(0, "not_accepted",
                                   f"commit answered {commit!r}")

    def _put_chunk(self, upload_id: str, offset: int, chunk: bytes) -> Any:
        assert self.client is not None
        response = self.client.request(
            "PUT", f"/v1/uploads/{upload_id}", chunk,
            headers={"Upload-Offset": str(offset)},
            content_type="application/octet-stream", retry=False)
        return response.json()

    def _resume_offset(self, server_round: int, upload_id: str, offset: int) -> int:
        """Return the coordinator's offset of an upload, retrying until it replies."""
        assert self.client is not None
        status = self.client.json("GET", f"/v1/uploads/{upload_id}")
        resumed = int(status["offset"])
        self.emit("resume", {"round": server_round, "offset": resumed,
                             "size": int(status["size"])})
        logger.info("fit round %d: upload interrupted at byte %d; the coordinator "
                    "has %d bytes, resuming there", server_round, offset, resumed)
        return resumed

    def model(self, version: int) -> ParameterSet:
        """Download a global model version (kept for the next task)."""
        assert self.client is not None
        if version not in self._models:
            payload = self.client.request("GET", f"/v1/models/{version}").content
            tensors, _ = wire.decode_tensors(payload, 1 << 31, "global model")
            self._models = {version: tensors}
        return self._models[version]

    # Evaluation and the end of the run.

    def evaluate(self, task: dict[str, Any]) -> None:
        """Evaluate a round's model on the site's test rows and report metrics."""
        assert self.client is not None
        server_round = int(task["round"])
        trainer = self.trainer(task["setup"])
        reply = trainer.evaluate(self.model(int(task["model_version"])))
        try:
            self.client.json("POST", f"/v1/rounds/{server_round}/evaluation",
                             {"num_samples": reply.num_samples,
                              "metrics": wire.to_json(reply.metrics)})
        except CoordinatorError as error:
            if error.status != 409:
                raise
            logger.warning("evaluate round %d: metrics not needed any more: %s",
                           server_round, error.detail)
        self.emit("evaluated", {"round": server_round})

    def finish(self, task: dict[str, Any]) -> None:
        """Save the final global model beside the site's state and stop."""
        version = int(task["final_version"])
        params = self.model(version)
        path = self.folder / "final_model.safetensors"
        write_atomic(path, params_to_bytes(params, {"version": str(version)}))
        self.final_model = path
        logger.info("done: site %s saved the final model (version %d) to %s",
                    self.options.site, version, path)
        self.emit("done", {"version": version, "path": str(path)})

    # Pending updates and the site client's state on disk.

    def _save_pending(self, pending: _Pending) -> None:
        tensors = {"payload": np.frombuffer(pending.payload, dtype=np.uint8)}
        metadata = {"format": "prifed-pending-1", "round": str(pending.server_round),
                    "num_samples": str(pending.num_samples),
                    "metrics": json.dumps(pending.metrics)}
        state_values, state_arrays = pending.client_state
        tensors |= {f"state/{k}": v for k, v in state_arrays.items()}
        metadata["state"] = json.dumps(state_values)
        write_atomic(self.folder / PENDING_FILE, params_to_bytes(tensors, metadata))

    def _load_pending(self) -> _Pending | None:
        path = self.folder / PENDING_FILE
        if not path.exists():
            return None
        tensors, metadata = _read_safetensors(path)
        arrays = {k[len("state/"):]: v for k, v in tensors.items()
                  if k.startswith("state/")}
        return _Pending(int(metadata["round"]), tensors["payload"].tobytes(),
                        int(metadata["num_samples"]), json.loads(metadata["metrics"]),
                        (json.loads(metadata["state"]), arrays))

    def _resolve_pending(self, pending: _Pending) -> None:
        save_client_state(self.folder / CLIENT_STATE_FILE, pending.client_state)
        (self.folder / PENDING_FILE).unlink(missing_ok=True)

    def _saved_client_state(self) -> ClientState | None:
        pending = self._load_pending()
        if pending is not None:
            return pending.client_state
        path = self.folder / CLIENT_STATE_FILE
        if not path.exists():
            return None
        tensors, metadata = _read_safetensors(path)
        return json.loads(metadata["state"]), tensors


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    data = path.read_bytes()
    tensors = params_from_bytes(data)
    (size,) = struct.unpack_from("<Q", data, 0)
    return tensors, json.loads(data[8:8 + size]).get("__metadata__") or {}


def save_client_state(path: Path, state: ClientState) -> None:
    """Write a client state as one safetensors file (arrays, JSON in metadata)."""
    values, arrays = state
    write_atomic(path, params_to_bytes(arrays, {"state": json.dumps(values)}))


def client_state(client: SiteClient, setup_digest: str) -> ClientState:
    """Capture what a site client carries between rounds.

    That is the trainer's shuffled stream (generator, order, position), and,
    where the client has them, SCAFFOLD's control variate and personal layers.
    """
    order, stream = client.trainer.stream_state()
    carried = {"control": dict(getattr(client, "control", {}) or {}),
               "local_tensors": dict(getattr(client, "local_tensors", {}) or {})}
    values, arrays = wire.state_to_parts(carried)
    arrays["stream/order"] = np.asarray(order, dtype=np.int64)
    return ({"setup": setup_digest, "rng": stream["rng"],
             "position": int(stream["position"]), "carried": values}, arrays)


def restore_client_state(client: SiteClient, state: ClientState) -> None:
    """Put back a state captured by :func:`client_state`."""
    values, arrays = state
    client.trainer.load_stream_state(arrays["stream/order"],
                                     {"position": values["position"],
                                      "rng": values["rng"]})
    carried = wire.state_from_parts(values["carried"], arrays)
    if hasattr(client, "control"):
        client.control = dict(carried.get("control", {}))
    if hasattr(client, "local_tensors"):
        client.local_tensors = dict(carried.get("local_tensors", {}))
