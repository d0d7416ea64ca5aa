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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prifed.core.params import params_to_bytes
from prifed.deploy.agent import SiteAgent
from prifed.deploy.heconfig import SETUP_KEY
from prifed.deploy.store import write_atomic
from prifed.errors import ConfigError
from prifed.log import get_logger

if TYPE_CHECKING:
    from prifed.training.client import SiteClient

logger = get_logger(__name__)


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
        site.start(get_params(initial))
        return HESiteClient(client, site)

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
