"""The coordinator service: the round engine behind an HTTPS API, resumable anywhere.

One process serves the API with uvicorn on its event loop and runs the
federation in a worker thread: first the statistics exchange that builds the
shared preprocessor, then :class:`~prifed.core.engine.RoundEngine` with the
configured strategy over :class:`~prifed.deploy.transport.NetworkTransport`.
After every round the new global model, the strategy's ``state_dict`` and the
engine's random generator are committed together. A coordinator killed at any
moment and started again continues from the last committed round, with the
updates already accepted in the open one.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI

from prifed.core.engine import RoundEngine, RoundRecord
from prifed.core.strategy import Strategy
from prifed.core.messages import Failure, TrainReply
from prifed.core.params import ParameterSet, is_float, params_from_bytes, \
    params_to_bytes, validate_update
from prifed.deploy import wire
from prifed.deploy.buffered import BufferedRun, load_records
from prifed.deploy.config import FederationConfig
from prifed.deploy.dpsite import private_strategy
from prifed.deploy.fhirsite import SPEC_HASH_KEY, check_spec_hash, \
    expected_spec_hash
from prifed.deploy.heconfig import homomorphic_strategy, setup_block
from prifed.deploy.errors import RequestRejected, ServiceStopped
from prifed.deploy.pki import PkiPaths
from prifed.deploy.secure import SECURE_EXCHANGE_PREFIX, check_secure_settings, \
    secure_network_transport
from prifed.deploy.server import build_app
from prifed.deploy.statistics import parse_statistics, to_site_statistics
from prifed.deploy.store import SITE_JOINED, SITE_REVOKED, ModelRow, Store, \
    write_atomic
from prifed.deploy.transport import ModelShelf, NetworkTransport, ReplyCheck, \
    TaskBoard
from prifed.errors import ConfigError, PriFedError
from prifed.log import get_logger, redact, round_label
from prifed.strategies import build_strategy
from prifed.strategies.fedbuff import FedBuff

logger = get_logger(__name__)

STATISTICS_EXCHANGE = "setup-statistics"
READY_FILE = "coordinator.json"


class DeployedEngine(RoundEngine):
    """The round engine with a durable checkpoint after every round."""

    def __init__(self, coordinator: Coordinator, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.coordinator = coordinator

    def run_round(self, server_round: int,
                  params: Mapping[str, np.ndarray]) -> ParameterSet:
        """Run one round, then commit its model and state before the next."""
        new_params = super().run_round(server_round, params)
        self.coordinator.checkpoint(server_round, new_params, self)
        return new_params


class Coordinator:
    """A federation's coordinator: state, transport, HTTP API and worker thread.

    ``initial_model`` starts the run from given tensors and skips the
    statistics exchange; benchmarks and callers with their own models use it.
    ``strategy`` replaces the one the config names, for strategies outside
    the registry (such as a homomorphic one built from a key file).
    """

    def __init__(self, config: FederationConfig,
                 initial_model: Mapping[str, np.ndarray] | None = None,
                 port: int | None = None, strategy: Strategy | None = None) -> None:
        self.config = config
        self.store = Store(config.database_url, config.state_dir)
        self.store.bind_config(config.fingerprint(), config.fingerprint_digest())
        self.store.sync_roster(list(config.federation.sites))
        self.board = TaskBoard()
        training = config.training
        self.models = ModelShelf(config.state_dir / "models", {
            "format": wire.MODEL_FORMAT, "model": training.model,
            "strategy": training.strategy})
        self.transport = NetworkTransport(self.store, config, self.board, self.models,
                                          ordered=config.rounds.ordered_replies)
        self.initial_model = None if initial_model is None else dict(initial_model)
        self.spec_hash = expected_spec_hash(config)
        if self.spec_hash is not None:
            expected = self.spec_hash
            self.transport.check_labels = lambda site, labels: check_spec_hash(
                expected, site, labels.get(SPEC_HASH_KEY), "an update")
        self.strategy = strategy
        check_secure_settings(config, strategy)
        self.port = config.coordinator.port if port is None else port
        self.app: FastAPI = build_app(config, self.store, self.transport, self.board,
                                      self._lifespan)
        self.server: uvicorn.Server | None = None
        self.exit_code = 1
        self.final_model: ParameterSet | None = None
        self.asynchronous = False
        """True once the run turned out to be FedBuff's asynchronous one."""
        self._started = time.time()

    # Serving.

    def serve(self) -> int:
        """Serve HTTPS until the run is done (and sites have heard) or a signal."""
        pki = PkiPaths(self.config.pki_dir)
        for path in (pki.server_key, pki.server_cert):
            if not path.is_file():
                raise ConfigError(f"{path} not found; create the federation's keys "
                                  "with `prifed ca init` first")
        settings = uvicorn.Config(
            self.app, host=self.config.coordinator.host, port=self.port,
            ssl_keyfile=str(pki.server_key), ssl_certfile=str(pki.server_cert),
            log_config=None, access_log=False, lifespan="on",
            timeout_graceful_shutdown=5, timeout_keep_alive=30,
            limit_concurrency=self.config.coordinator.max_connections)
        self.server = uvicorn.Server(settings)
        release_large_buffers()
        training = self.config.training
        pace = (f"{training.rounds} tasks per site, asynchronous"
                if training.strategy.lower() == "fedbuff"
                else f"{training.rounds} rounds")
        logger.info("coordinator: federation %s, %d sites, %s, state in %s",
                    self.config.federation.name, len(self.config.federation.sites),
                    pace, self.config.state_dir)
        try:
            self.server.run()
        finally:
            (self.config.state_dir / READY_FILE).unlink(missing_ok=True)
            self.store.close()
        logger.info("coordinator: stopped with exit code %d", self.exit_code)
        return self.exit_code

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.board.bind_loop(asyncio.get_running_loop())
        worker = threading.Thread(target=self._work, name="prifed-rounds", daemon=True)
        worker.start()
        yield
        self.transport.stop()

    def _work(self) -> None:
        try:
            self._announce()
            self.run()
            self.exit_code = 0
            self._linger()
        except ServiceStopped:
            logger.info("coordinator: stopped; the run resumes from its state when "
                        "started again")
        except PriFedError as error:
            logger.error("coordinator: %s", redact(str(error), 1000))
            self.exit_code = 2
        except Exception:
            logger.exception("coordinator: the round engine failed")
            self.exit_code = 1
        finally:
            if self.server is not None:
                self.server.should_exit = True

    def _announce(self) -> None:
        """Wait until uvicorn listens, then write the ready file with the port."""
        deadline = time.monotonic() + 60
        while self.server is not None and not self.server.started:
            if time.monotonic() > deadline or self.server.should_exit:
                raise ServiceStopped("the HTTPS server did not start")
            time.sleep(0.02)
        port = self.port
        if self.server is not None and self.server.servers:
            port = self.server.servers[0].sockets[0].getsockname()[1]
        host = self.config.coordinator.host
        ready = {"pid": os.getpid(), "port": port, "url": f"https://{host}:{port}",
                 "started_at": time.time()}
        write_atomic(self.config.state_dir / READY_FILE, json.dumps(ready).encode())
        logger.info("coordinator: listening on https://%s:%d", host, port)

    def _linger(self) -> None:
        """Keep serving "done" until every joined site has seen it, or time runs out."""
        deadline = time.monotonic() + self.config.coordinator.linger_seconds
        while time.monotonic() < deadline:
            joined = {s.name for s in self.store.sites() if s.status == SITE_JOINED}
            if joined <= self.board.saw_final:
                logger.info("coordinator: every site fetched the final task; "
                            "shutting down")
                return
            time.sleep(0.1)
        logger.info("coordinator: shutting down; not every site fetched the final "
                    "task")

    # The federation.

    def run(self) -> ParameterSet:
        """Run setup and every remaining round; return the final global model."""
        if self.initial_model is None:
            # Import torch while sites send their statistics; it takes seconds.
            threading.Thread(target=_import_models, name="prifed-import",
                             daemon=True).start()
            self._setup()
        params, trainable = self._initial_model()

        training = self.config.training
        strategy = self.strategy or build_strategy(
            training.strategy, sites_per_round=training.sites_per_round,
            local_config=training.local_config(), **training.strategy_options)
        strategy = homomorphic_strategy(self.config, strategy)
        strategy = private_strategy(self.config, strategy)
        self.transport.check_reply = strategy_reply_check(strategy)
        if isinstance(strategy, FedBuff):
            self.asynchronous = True
            final = BufferedRun(self.config, self.store, self.transport, self.models,
                                strategy, on_version=self._on_version
                                ).run(params, trainable)
            self._finish(final, strategy.version)
            return final
        transport = secure_network_transport(self.config, strategy, self.transport,
                                             params)
        engine = DeployedEngine(self, strategy, transport, training.rounds,
                                seed=self.config.federation.seed,
                                evaluate_every=training.evaluate_every,
                                on_round=self._on_round)

        latest = self.store.latest_model()
        start = 1
        if latest is not None and latest.version >= 1:
            params = self._load_version(latest.version)
            self._restore(latest, strategy, engine, params, trainable)
            start = latest.version + 1

        final = engine.run(params, trainable, start_round=start) \
            if start <= training.rounds else params
        self._finish(final, training.rounds)
        return final

    def _restore(self, latest: ModelRow, strategy: Strategy, engine: RoundEngine,
                 params: ParameterSet, trainable: list[str]) -> None:
        """Put back the strategy and generator state committed after a round."""
        strategy.initialize(params, trainable)
        arrays: dict[str, np.ndarray] = {}
        if latest.strategy_arrays:
            arrays = params_from_bytes(Path(latest.strategy_arrays).read_bytes())
        strategy.load_state_dict(wire.state_from_parts(
            json.loads(latest.strategy_state), arrays))
        engine.rng.bit_generator.state = json.loads(latest.rng_state)
        logger.info("coordinator: resuming after round %d of %d", latest.version,
                    self.config.training.rounds)

    def _setup(self) -> None:
        stored = self.store.get_meta("preprocessing")
        if stored is None:
            stored = self._gather_statistics()
            self.store.set_meta("preprocessing", stored)
        self.transport.participants = list(stored["sites"])
        # States saved before row counts were kept have no limits.
        self.transport.max_samples = dict(stored.get("num_rows") or {})
        seed = self.config.federation.seed
        for site in stored["sites"]:
            position = self.config.federation.sites.index(site)
            self.transport.setup_blocks[site] = {
                "seed": seed, "test_fraction": self.config.training.test_fraction,
                "model": self.config.training.model, "model_seed": seed,
                "client_seed": seed + position,
                "preprocessor": stored["preprocessors"][site],
                **setup_block(self.config)}

    def _gather_statistics(self) -> dict[str, Any]:
        """Ask every site for its statistics and merge them into preprocessors."""
        from prifed.data.preprocess import build_preprocessors

        rounds = self.config.rounds
        training = self.config.training
        roster = [s.name for s in self.store.sites() if s.status != SITE_REVOKED]
        request = wire.dumps({"seed": self.config.federation.seed,
                              "test_fraction": training.test_fraction})
        logger.info("setup: asking %d sites for their statistics (deadline %g s)",
                    len(roster), rounds.setup_deadline_seconds)
        replies = {}
        for item in self.transport.exchange(
                "statistics", STATISTICS_EXCHANGE, 0, {s: request for s in roster},
                rounds.setup_deadline_seconds, validate=self._validate_statistics):
            if isinstance(item, Failure):
                logger.warning("setup: site %s sent no statistics: %s", item.site,
                               item.reason)
                continue
            site, body = item
            replies[site] = parse_statistics(site, body)
            logger.info("setup: statistics from site %s (%d of %d)", site,
                        len(replies), len(roster))
        sites = [s for s in roster if s in replies]
        if len(sites) < rounds.min_sites:
            raise PriFedError(f"setup: {len(sites)} of {len(roster)} sites sent "
                              "statistics before the deadline; min_sites is "
                              f"{rounds.min_sites}")
        numeric, categorical = replies[sites[0]].numeric, replies[sites[0]].categorical
        for site in sites[1:]:
            if (replies[site].numeric, replies[site].categorical) != (numeric,
                                                                       categorical):
                raise ConfigError(
                    f"setup: site {site!r} has feature columns {replies[site].numeric}"
                    f" + {replies[site].categorical}, site {sites[0]!r} has {numeric} "
                    f"+ {categorical}; every site must use the same columns (pin "
                    "them with training.numeric and training.categorical)")
        stats = {s: to_site_statistics(replies[s]) for s in sites}
        preprocessors = build_preprocessors(stats, numeric, categorical,
                                            training.standardize)
        logger.info("setup: merged statistics of %d sites into %d features", len(sites),
                    len(preprocessors[sites[0]].feature_names))
        return {"sites": sites, "numeric": numeric, "categorical": categorical,
                "num_features": len(preprocessors[sites[0]].feature_names),
                "num_rows": {s: replies[s].num_rows for s in sites},
                "preprocessors": {s: preprocessors[s].to_dict() for s in sites}}

    def _validate_statistics(self, site: str, body: bytes) -> None:
        stats = parse_statistics(site, body)
        check_spec_hash(self.spec_hash, site, stats.fhir_spec_hash, "statistics")
        training = self.config.training
        for name, pinned, sent in (("numeric", training.numeric, stats.numeric),
                                   ("categorical", training.categorical,
                                    stats.categorical)):
            if pinned is not None and list(pinned) != list(sent):
                raise RequestRejected(422, "invalid_statistics",
                                      f"site {site!r} sent {name} columns {sent}; the "
                                      f"federation uses {list(pinned)}")

    def _initial_model(self) -> tuple[ParameterSet, list[str]]:
        """Return version 0 of the model and its trainable tensors, made once."""
        if self.store.latest_model() is not None:
            return self._load_version(0), list(self.store.get_meta("trainable"))
        if self.initial_model is not None:
            params = dict(self.initial_model)
            trainable = [name for name, value in params.items() if is_float(value)]
        else:
            from prifed.training.models import build_model, get_params, trainable_names

            preprocessing = self.store.get_meta("preprocessing")
            model = build_model(self.config.training.model,
                                int(preprocessing["num_features"]),
                                self.config.federation.seed)
            params, trainable = get_params(model), trainable_names(model)
        self.store.set_meta("param_names", list(params))
        self.store.set_meta("trainable", trainable)
        path, digest = self.models.publish(0, params)
        fresh = np.random.default_rng(self.config.federation.seed)
        self.store.commit_model(ModelRow(
            version=0, path=str(path), sha256=digest, strategy_state="{}",
            strategy_arrays=None, rng_state=json.dumps(fresh.bit_generator.state),
            created_at=time.time()), None)
        return params, trainable

    def _load_version(self, version: int) -> ParameterSet:
        names = self.store.get_meta("param_names")
        return params_from_bytes(self.models.path(version).read_bytes(), order=names)

    def checkpoint(self, server_round: int, params: Mapping[str, np.ndarray],
                   engine: RoundEngine) -> None:
        """Commit a round's model, strategy state and generator state together."""
        path, digest = self.models.publish(server_round, params)
        values, arrays = wire.state_to_parts(engine.strategy.state_dict())
        arrays_path = None
        if arrays:
            arrays_file = self.config.state_dir / "models" / \
                f"strategy-{server_round:04d}.safetensors"
            write_atomic(arrays_file, params_to_bytes(arrays))
            arrays_path = str(arrays_file)
        record = wire.to_json(asdict(engine.history[-1]))
        self.store.commit_model(ModelRow(
            version=server_round, path=str(path), sha256=digest,
            strategy_state=json.dumps(values), strategy_arrays=arrays_path,
            rng_state=json.dumps(engine.rng.bit_generator.state),
            created_at=time.time()), record)
        if not self.config.coordinator.keep_updates:
            folder = self.config.state_dir / "updates" / f"round-{server_round:04d}"
            for item in folder.glob("*"):
                item.unlink()
            if folder.exists():
                folder.rmdir()
        for upload_id in self.store.delete_uploads(server_round):
            self.transport.part_path(upload_id).unlink(missing_ok=True)

    def _on_round(self, record: RoundRecord) -> None:
        label = round_label(record.server_round, self.config.training.rounds)
        accuracy = _mean([m.get("accuracy", math.nan)
                          for m in record.eval_metrics.values()])
        logger.info("%s done: %d accepted, %d failures, %d rejected, mean "
                    "accuracy %.3f (%.1f s)", label, len(record.accepted),
                    len(record.failures), len(record.rejected), accuracy,
                    record.seconds)

    def _on_version(self, record: dict[str, Any]) -> None:
        losses = [u["metrics"].get("train_loss") for u in record["updates"]]
        loss = _mean(losses)
        logger.info("async: version %d done after %d tasks, mean train loss %.4f "
                    "(%.1f s since start)", record["version"], record["tasks_done"],
                    loss, record["seconds"])

    def _finish(self, final: ParameterSet, final_version: int) -> None:
        self.final_model = final
        folder = self.config.state_dir
        preprocessing = self.store.get_meta("preprocessing") or {}
        metadata = {"format": wire.MODEL_FORMAT, "model": self.config.training.model,
                    "strategy": self.config.training.strategy}
        preprocessors = preprocessing.get("preprocessors") or {}
        if preprocessors:
            metadata["preprocessor"] = json.dumps(next(iter(preprocessors.values())))
        write_atomic(folder / "final_model.safetensors",
                     params_to_bytes(final, metadata))
        write_atomic(folder / "summary.json",
                     json.dumps(wire.to_json(self.summary()), indent=2).encode())
        self.transport.finished = True
        # The last round's masked messages are not needed once it is committed.
        self.store.delete_exchange_replies(SECURE_EXCHANGE_PREFIX)
        self.board.finish({"id": "done", "kind": "done",
                           "final_version": final_version})
        logger.info("done: final model written to %s",
                    folder / "final_model.safetensors")

    def summary(self) -> dict[str, Any]:
        """Return the run's summary: settings, rounds and final per-site metrics."""
        if self.asynchronous:
            records = load_records(self.store)
        else:
            records = self.store.round_records()
        final = records[-1]["eval_metrics"] if records else {}
        return {"federation": self.config.federation.name,
                "config": self.config.fingerprint(),
                "participants": self.transport.participants,
                "mode": "asynchronous" if self.asynchronous else "synchronous",
                "rounds": records,
                "final": {"per_site": final,
                          "mean_accuracy": _mean([m.get("accuracy") for m in
                                                  final.values()])}}


def strategy_reply_check(strategy: Any) -> ReplyCheck:
    """Return the strategy's own checks of a reply, as the round engine runs them."""

    def check(reply: TrainReply, params: Mapping[str, np.ndarray]) -> None:
        check_update = getattr(strategy, "check_update", None)
        if check_update is None:
            validate_update(reply.site, params, reply.params)
        else:
            check_update(reply, params)
        check_reply = getattr(strategy, "check_reply", None)
        if check_reply is not None:
            check_reply(reply, params)

    return check


_M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter number for the mmap threshold (malloc.h)."""


def release_large_buffers() -> None:
    """Make glibc mmap every allocation of 1 MiB or more, so freeing one returns it.

    By default glibc raises its mmap threshold after the first large block is
    freed and then keeps update-sized buffers in its heaps, so the resident
    memory of the coordinator would grow with the number of updates it has
    checked. Does nothing where libc.so.6 is not glibc or not found.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        return


def _import_models() -> None:
    import prifed.training.models  # noqa: F401


def _mean(values: list[Any]) -> float:
    defined = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(defined)) if defined else math.nan
