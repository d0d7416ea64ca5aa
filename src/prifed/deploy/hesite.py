"""CKKS in a deployed federation: the coordinator adds ciphertexts it cannot read.

The federation config's ``[homomorphic]`` section names the coordinator's
context file (from ``prifed he keygen``, without the secret key). The
coordinator then wraps its strategy in
:class:`~prifed.he.strategy.HomomorphicStrategy` and relays encrypted sums as
model versions. Each site runs :class:`HESiteAgent` (``prifed site --he-key
FILE``, the site context with the secret key): it wraps its trainer in an
:class:`~prifed.he.client.HESiteClient`, keeps the global model and the server
optimiser state, and saves the decrypted final model. Only version 0, the
public initial model, is ever in the clear at the coordinator.

The agent writes its copy of the global model, the optimiser state and the
last round applied to ``he-site-state.safetensors`` in its state folder each
time it applies an aggregate, before it trains on the result. An agent
started again loads that file, so it can go on with the next aggregate.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from prifed.core.params import params_from_bytes, params_to_bytes, validate_update
from prifed.deploy.agent import SiteAgent
from prifed.deploy.heconfig import SETUP_KEY
from prifed.deploy.store import write_atomic
from prifed.errors import ConfigError, UpdateRejected
from prifed.log import get_logger

if TYPE_CHECKING:
    from prifed.he.site import HESite
    from prifed.training.client import SiteClient

logger = get_logger(__name__)

STATE_FILE = "he-site-state.safetensors"
"""The site's CKKS state in its state folder: global model, optimiser, round."""


@dataclass
class HESiteAgent(SiteAgent):
    """A site agent whose trainer encrypts updates and decrypts aggregates."""

    key_file: Path | None = None

    def trainer(self, setup: dict[str, Any]) -> Any:
        """Return the site's CKKS trainer, built once per setup block."""
        block = setup.get(SETUP_KEY)
        if block is None:
            raise ConfigError(f"site {self.options.site!r} was started with --he-key, "
                              "and the coordinator does not run homomorphic "
                              "aggregation; add [homomorphic] to its config or "
                              "start the site without --he-key")
        self.wrap_client = lambda client: self._encrypting(client, block)
        return super().trainer(setup)

    def _encrypting(self, client: SiteClient, block: dict[str, Any]) -> Any:
        from prifed.he.client import HESiteClient
        from prifed.he.keys import read_key_file
        from prifed.he.site import HESite
        from prifed.he.strategy import site_optimizer
        from prifed.training.models import get_params, trainable_names

        if self.key_file is None:
            raise ConfigError("HESiteAgent needs key_file, the site context")
        optimizer = site_optimizer(str(block["strategy"]),
                                   dict(block["strategy_options"]))
        initial = client.model_factory()
        site = HESite(client.name, read_key_file(self.key_file), optimizer,
                      trainable_names(initial))
        # The CKKS layout depends on tensor order, and a downloaded model lists
        # tensors by name, so start from the model as built (version 0's digest).
        first = get_params(initial)
        site.start(first)
        saved = SavedSiteState(self.folder / STATE_FILE, first)
        saved.restore(site)
        return HESiteClient(client, site, on_apply=saved.save)

    def finish(self, task: dict[str, Any]) -> None:
        """Decrypt the final aggregate and save the model in the clear, here only."""
        version = int(task["final_version"])
        if self._trainer is None:
            raise ConfigError(f"site {self.options.site!r} took part in no round, so "
                              "it cannot decrypt the final model")
        model = self._trainer.site.receive(self.model(version))
        path = self.folder / "final_model.safetensors"
        write_atomic(path, params_to_bytes(model, {"version": str(version)}))
        self.final_model = path
        logger.info("done: site %s decrypted the final model (version %d) to %s",
                    self.options.site, version, path)
        self.emit("done", {"version": version, "path": str(path)})


class SavedSiteState:
    """The file that keeps a site's CKKS state across agent restarts.

    ``initial`` is the model version 0 as built at the site. Its digest and
    the key id are stored with the state, so a file left by another run or
    key is ignored instead of loaded.
    """

    def __init__(self, path: Path, initial: Mapping[str, np.ndarray]) -> None:
        from prifed.he.packing import model_digest

        self.path = path
        self.initial = dict(initial)
        self.initial_digest = model_digest(initial)

    def restore(self, site: HESite) -> None:
        """Load the saved state into ``site`` when it belongs to this run and key."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        state = params_from_bytes(data)
        (size,) = struct.unpack_from("<Q", data, 0)
        metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
        if (metadata.get("initial"), metadata.get("key_id")) != (
                self.initial_digest, site.key.key_id):
            logger.warning("site %s: ignoring %s, which was saved for another run "
                           "or CKKS key", site.name, self.path)
            return
        # Safetensors files list tensors by name, but the layout needs model order.
        model = {name: state[f"model.{name}"] for name in self.initial
                 if f"model.{name}" in state}
        try:
            validate_update(site.name, self.initial, model)
        except UpdateRejected as error:
            raise ConfigError(f"{self.path} does not contain a model of this run's "
                              f"form ({error.reason}, tensor {error.tensor}); "
                              "copy the file from another site of the run, "
                              "which has the same global model and optimiser "
                              "state") from None
        ordered = {f"model.{name}": value for name, value in model.items()}
        ordered.update({k: v for k, v in state.items() if not k.startswith("model.")})
        site.load_state_dict(ordered)
        logger.info("site %s: restored the CKKS state after round %d from %s",
                    site.name, site.applied_round, self.path)

    def save(self, site: HESite) -> None:
        """Write the site's state atomically."""
        metadata = {"initial": self.initial_digest, "key_id": site.key.key_id,
                    "applied_round": str(site.applied_round)}
        write_atomic(self.path, params_to_bytes(site.state_dict(), metadata))
