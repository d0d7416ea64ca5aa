"""Commands of a deployed federation: ``prifed ca``, ``coordinator`` and ``site``.

Heavy modules (torch, FastAPI, uvicorn) are imported inside the commands, so
``prifed --help`` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from prifed.cli_options import (CategoricalOption, DropIncompleteOption,
                                DropOption, LabelOption, LabelThresholdOption,
                                NumericOption)
from prifed.cli_options import split_list as _split
from prifed.errors import ConfigError

if TYPE_CHECKING:
    from prifed.deploy.config import FederationConfig
    from prifed.deploy.store import Store

ca_app = typer.Typer(help="The federation's certificate authority, join tokens and "
                          "revocation.", no_args_is_help=True, add_completion=False)

TOKEN_ENV = "PRIFED_JOIN_TOKEN"

ConfigOption = Annotated[Path, typer.Option(
    "--config", "-c", help="federation config file (TOML)")]


def register(app: typer.Typer) -> None:
    """Add the deployment commands to the ``prifed`` command line."""
    app.add_typer(ca_app, name="ca")
    app.command("coordinator")(coordinator)
    app.command("site")(site)


def configure_service_logging(log_file: Path | None, verbose: bool) -> None:
    """Log to stderr (warnings, or everything with --verbose) and append to a file."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger("prifed")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    screen = logging.StreamHandler(sys.stderr)
    screen.setLevel(logging.INFO if verbose else logging.WARNING)
    screen.setFormatter(formatter)
    handlers: list[logging.Handler] = [screen]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file, mode="a")
        to_file.setFormatter(formatter)
        handlers.append(to_file)
    for handler in handlers:
        root.addHandler(handler)
    server_log = logging.getLogger("uvicorn.error")
    server_log.setLevel(logging.WARNING)
    for handler in handlers:
        server_log.addHandler(handler)


@ca_app.command("init")
def ca_init(
    config: ConfigOption,
    hostname: Annotated[list[str] | None, typer.Option(
        help="DNS name sites use to reach the coordinator (repeatable; default "
             "localhost)")] = None,
    ip: Annotated[list[str] | None, typer.Option(
        help="IP address sites use to reach the coordinator (repeatable; default "
             "127.0.0.1)")] = None,
    days: Annotated[int, typer.Option(help="validity of the coordinator "
                                           "certificate in days")] = 825,
    force: Annotated[bool, typer.Option(help="replace an existing CA")] = False,
) -> None:
    """Create the federation CA and the coordinator's TLS certificate."""
    from prifed.deploy.config import load_config
    from prifed.deploy.pki import certificate_fingerprint, init_pki

    settings = load_config(config)
    if hostname is None and ip is None:
        hostnames, ips = ["localhost"], ["127.0.0.1"]
    else:
        hostnames, ips = list(hostname or []), list(ip or [])
    paths = init_pki(settings.pki_dir, settings.federation.name, hostnames, ips, days,
                     force)
    typer.echo(f"CA certificate: {paths.ca_cert} (give this file to every site)")
    typer.echo(f"CA fingerprint (SHA-256): {certificate_fingerprint(paths.ca_cert)}")
    typer.echo(f"coordinator certificate: {paths.server_cert} for "
               f"{', '.join(hostnames + ips)}")
    typer.echo(f"keep {paths.ca_key} offline or readable by the operator only")


@ca_app.command("issue-token")
def ca_issue_token(
    config: ConfigOption,
    site_name: Annotated[str, typer.Option("--site", help="site the token is for")],
    valid_hours: Annotated[float, typer.Option(help="hours until the token "
                                                    "expires")] = 168.0,
    out: Annotated[Path | None, typer.Option(
        help="write the token to this file (mode 600) instead of printing it")] = None,
) -> None:
    """Issue a one-time join token for a site of the roster."""
    from prifed.deploy.config import load_config
    from prifed.deploy.pki import new_join_token, token_digest
    from prifed.deploy.store import Store

    settings = load_config(config)
    if valid_hours <= 0:
        raise ConfigError(f"--valid-hours must be positive; got {valid_hours}")
    store = Store(settings.database_url, settings.state_dir)
    store.sync_roster(list(settings.federation.sites))
    token = new_join_token()
    store.add_token(site_name, token_digest(token), valid_hours * 3600)
    store.close()
    if out is not None:
        descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(token + "\n")
        typer.echo(f"join token for site {site_name!r} written to {out} (valid "
                   f"{valid_hours:g} h, usable once)", err=True)
        return
    typer.echo(f"join token for site {site_name!r} (valid {valid_hours:g} h, usable "
               "once; send it over a trusted channel):", err=True)
    typer.echo(token)


@ca_app.command("revoke")
def ca_revoke(
    config: ConfigOption,
    site_name: Annotated[str, typer.Option("--site", help="site to revoke")],
) -> None:
    """Revoke a site: the coordinator rejects its key from the next request on."""
    from prifed.deploy.config import load_config
    from prifed.deploy.store import Store

    settings = load_config(config)
    store = Store(settings.database_url, settings.state_dir)
    store.revoke(site_name)
    store.close()
    typer.echo(f"site {site_name!r} is revoked; a new join token re-enrols it")


@ca_app.command("status")
def ca_status(config: ConfigOption) -> None:
    """List the roster's sites with their status, and the rounds so far."""
    import time

    from prifed.deploy.config import load_config
    from prifed.deploy.store import Store

    settings = load_config(config)
    store = Store(settings.database_url, settings.state_dir)
    now = time.time()
    for info in store.sites():
        seen = ("never" if info.last_seen is None
                else f"{now - info.last_seen:.0f} s ago")
        typer.echo(f"{info.position:3d}  {info.name:30s} {info.status:8s} last seen "
                   f"{seen}")
    if settings.training.strategy.lower() == "fedbuff":
        typer.echo(asynchronous_progress(store, settings))
    else:
        rounds = store.rounds()
        done = sum(1 for r in rounds if r["status"] == "done")
        typer.echo(f"rounds done: {done} of {settings.training.rounds}")
    store.close()


def asynchronous_progress(store: Store, settings: FederationConfig) -> str:
    """Describe how far an asynchronous (FedBuff) run is, from its committed state."""
    from prifed.deploy.buffered import STATE_KEY, load_records

    state = store.get_meta(STATE_KEY)
    if state is None:
        return "asynchronous run: not started"
    preprocessing = store.get_meta("preprocessing") or {}
    sites = len(preprocessing.get("sites") or settings.federation.sites)
    rounds = settings.training.rounds
    versions = [r["version"] for r in load_records(store) if not r.get("final")]
    return (f"asynchronous run: {state['ended']} of {rounds * sites} tasks done, "
            f"model version {max(versions, default=0)}, {len(state['tasks'])} tasks "
            "open")


def coordinator(
    config: ConfigOption,
    port: Annotated[int | None, typer.Option(
        help="port to listen on (overrides the config; 0 picks a free one)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="log every event to stderr")] = False,
) -> None:
    """Run the coordinator service of a federation until its run is done."""
    from prifed.deploy.config import load_config
    from prifed.deploy.coordinator import Coordinator

    settings = load_config(config)
    configure_service_logging(settings.state_dir / "coordinator.log", verbose)
    service = Coordinator(settings, port=port)
    code = service.serve()
    if code:
        raise typer.Exit(code)


def site(
    coordinator_url: Annotated[str, typer.Option(
        "--coordinator", help="coordinator URL, such as https://fl.example.org:8443")],
    ca: Annotated[Path, typer.Option(help="the federation's CA certificate (ca.pem)")],
    name: Annotated[str, typer.Option(help="this site's name in the roster")],
    state_dir: Annotated[Path, typer.Option(
        help="folder for this site's key and state")],
    token_file: Annotated[Path | None, typer.Option(
        help=f"file with the one-time join token (or set {TOKEN_ENV})")] = None,
    data: Annotated[Path | None, typer.Option(
        help="CSV with this site's rows; default: the shipped heart disease data")
    ] = None,
    site_column: Annotated[str | None, typer.Option(
        help="column naming each row's site; rows of other sites are ignored")
    ] = None,
    label: LabelOption = None,
    label_threshold: LabelThresholdOption = None,
    numeric: NumericOption = None,
    categorical: CategoricalOption = None,
    drop: DropOption = None,
    drop_incomplete: DropIncompleteOption = False,
    chunk_kib: Annotated[int, typer.Option(help="upload chunk size in KiB")] = 1024,
    long_poll: Annotated[float, typer.Option(
        help="seconds each long poll waits for work")] = 25.0,
    max_offline: Annotated[float | None, typer.Option(
        help="give up after the coordinator is unreachable this many seconds "
             "(default: one hour before the first contact, then keep trying)")
    ] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for torch (default: torch's choice, one per core); "
             "use 1 when several agents share a machine")] = None,
    fhir: Annotated[Path | None, typer.Option(
        help="FHIR export (bundles or NDJSON) to build this site's table from; "
             "needs --fhir-spec")] = None,
    fhir_spec: Annotated[Path | None, typer.Option(
        help="the federation's FHIR feature spec (TOML), used unchanged")] = None,
    he_key: Annotated[Path | None, typer.Option(
        help="the CKKS site context with the secret key (prifed he keygen), for "
             "a federation with homomorphic aggregation")] = None,
    privacy_dir: Annotated[Path | None, typer.Option(
        help="this site's privacy folder (policy file and ledger): train only "
             "with DP, within the site's own limit")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="log every event to stderr")] = False,
) -> None:
    """Run a site agent: join once, then train and evaluate when asked."""
    from prifed.data.tabular import TableSpec
    from prifed.deploy.agent import AgentOptions, SiteAgent
    from prifed.deploy.sitedata import TableSource

    if chunk_kib < 1:
        raise ConfigError(f"--chunk-kib must be at least 1; got {chunk_kib}")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1; got {threads}")
        import torch

        torch.set_num_threads(threads)
    token = os.environ.get(TOKEN_ENV)
    if token_file is not None:
        token = token_file.read_text().strip()
    spec = None
    if data is not None:
        if label is None:
            raise ConfigError("--data needs --label")
        spec = TableSpec(site_column or "", label, _split(numeric),
                         _split(categorical), _split(drop) or [], label_threshold,
                         drop_incomplete)
    elif label or site_column:
        raise ConfigError("--site-column and --label apply only with --data")
    configure_service_logging(state_dir / "agent.log", verbose)
    options = AgentOptions(coordinator_url, ca, name, state_dir, token,
                           chunk_bytes=chunk_kib * 1024, long_poll_seconds=long_poll,
                           max_offline_seconds=max_offline)
    if (fhir is None) != (fhir_spec is None):
        raise ConfigError("--fhir and --fhir-spec go together; got only "
                          + ("--fhir" if fhir is not None else "--fhir-spec"))
    if fhir is not None and data is not None:
        raise ConfigError("use --data or --fhir, not both")
    agent = SiteAgent(options, TableSource(data, spec))
    if he_key is not None:
        from prifed.deploy.hesite import HESiteAgent

        agent = HESiteAgent(options, TableSource(data, spec), key_file=he_key)
    if fhir is not None and fhir_spec is not None:
        from prifed.deploy.fhirsite import SPEC_HASH_KEY, FhirSource, with_spec_hash

        source = FhirSource(fhir, fhir_spec)
        agent.source = source
        agent.handlers["statistics"] = with_spec_hash(agent.handlers["statistics"],
                                                      source.digest)
        agent.update_labels[SPEC_HASH_KEY] = source.digest
    if privacy_dir is not None:
        from prifed.deploy.dpsite import private_client

        agent.wrap_client = private_client(privacy_dir)
    final = agent.run()
    typer.echo(f"site {name}: run finished; final model in {final}", err=True)
