"""The ``prifed`` command line."""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.measure import Measurement
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from prifed.cli_options import (CategoricalOption, DropIncompleteOption,
                                DropOption, LabelOption, LabelThresholdOption,
                                NumericOption)
from prifed.cli_options import split_list as _split
from prifed.deploy.cli import register as register_deploy
from prifed.errors import PriFedError
from prifed.fhir.cli import data_app
from prifed.he.cli import he_app
from prifed.privacy.cli import privacy_app

app = typer.Typer(help="PriFed: privacy-preserving federated learning for health AI.",
                  no_args_is_help=True, add_completion=False)
console = Console(stderr=True)


@app.callback()
def root() -> None:
    """PriFed: privacy-preserving federated learning for health AI."""


def configure_logging(verbose: bool, log_file: Path | None = None) -> None:
    """Log warnings to the console (all with --verbose) and everything to a file."""
    root = logging.getLogger("prifed")
    root.setLevel(logging.INFO)
    close_logging()
    screen = RichHandler(console=console, show_path=False, markup=False)
    screen.setLevel(logging.INFO if verbose else logging.WARNING)
    root.addHandler(screen)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file, mode="w")
        to_file.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(to_file)
    # Importing Opacus calls logging.basicConfig, which would print every
    # line a second time through the root logger.
    root.propagate = False


def close_logging() -> None:
    """Remove and close the handlers that :func:`configure_logging` added."""
    root = logging.getLogger("prifed")
    root.propagate = True
    for handler in list(root.handlers):
        if not isinstance(handler, logging.NullHandler):
            root.removeHandler(handler)
            handler.close()


def _site_values(text: str | None, option: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for item in _split(text) or []:
        site, sep, number = item.rpartition("=")
        if not sep or not site.strip():
            raise PriFedError(f"{option} takes SITE=NUMBER items; got {item!r}")
        try:
            values[site.strip()] = float(number)
        except ValueError:
            raise PriFedError(f"{option}: {number!r} for site {site.strip()!r} is "
                              "not a number") from None
    return values


def _site_profiles(speed: str | None, availability: str | None,
                   profile: Any) -> dict[str, Any]:
    speeds = _site_values(speed, "--site-speed")
    shares = _site_values(availability, "--site-availability")
    return {site: profile(speeds.get(site, 1.0), shares.get(site, 1.0))
            for site in [*speeds, *[s for s in shares if s not in speeds]]}


@app.command()
def simulate(
    data: Annotated[Path | None, typer.Option(
        help="CSV with one row per patient; default: the shipped four-centre "
             "UCI heart disease data")] = None,
    site_column: Annotated[str | None, typer.Option(
        help="column naming each row's site")] = None,
    label: LabelOption = None,
    label_threshold: LabelThresholdOption = None,
    numeric: NumericOption = None,
    categorical: CategoricalOption = None,
    drop: DropOption = None,
    drop_incomplete: DropIncompleteOption = False,
    sites: Annotated[str | None, typer.Option(
        help="comma-separated sites to include (default: all)")] = None,
    model: Annotated[str, typer.Option(help="logreg or mlp")] = "logreg",
    strategy: Annotated[str, typer.Option(
        help="federated strategy, or a comma-separated list to compare on the "
             "same splits and seeds; options follow the name, e.g. "
             "fedavg,fedyogi:server_lr=0.03,fedprox:mu=0.1")] = "fedavg",
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 15,
    local_steps: Annotated[int, typer.Option(
        help="mini-batch steps per site per round")] = 100,
    batch_size: Annotated[int, typer.Option(help="rows per mini-batch")] = 4,
    lr: Annotated[float, typer.Option(
        help="local SGD learning rate (FLamby's protocol uses 0.001)")] = 0.01,
    sites_per_round: Annotated[int | None, typer.Option(
        help="sites sampled per round (default: all)")] = None,
    standardize: Annotated[str, typer.Option(
        help="federated (one mean/std merged from site statistics) or site "
             "(each site its own)")] = "federated",
    baselines: Annotated[bool, typer.Option(
        help="also train the site-local and pooled baselines")] = True,
    seed: Annotated[int, typer.Option(help="seed of splits, weights and "
                                           "shuffling")] = 42,
    split_seed: Annotated[int | None, typer.Option(
        help="seed of the train/test splits only (default: --seed)")] = None,
    personal_layers: Annotated[str | None, typer.Option(
        help="comma-separated tensor names or module prefixes each site keeps "
             "local, e.g. linear.bias; adds a personalised row per strategy")
    ] = None,
    finetune_steps: Annotated[int, typer.Option(
        help="local fine-tuning steps before a site scores its personalised "
             "model (0: none)")] = 0,
    finetune_lr: Annotated[float | None, typer.Option(
        help="fine-tuning learning rate (default: --lr)")] = None,
    site_speed: Annotated[str | None, typer.Option(
        help="comma-separated SITE=SPEED, relative training speed in simulated "
             "time (0.1: ten times slower)")] = None,
    site_availability: Annotated[str | None, typer.Option(
        help="comma-separated SITE=FRACTION of time windows a site is online")
    ] = None,
    step_seconds: Annotated[float, typer.Option(
        help="simulated seconds of one local step at speed 1")] = 0.01,
    partition: Annotated[str, typer.Option(
        help="natural (the site column), or a SYNTHETIC split of the pooled "
             "rows: iid, dirichlet (label skew) or quantity (size skew)")
    ] = "natural",
    partition_sites: Annotated[int, typer.Option(
        help="number of synthetic sites")] = 4,
    partition_alpha: Annotated[float, typer.Option(
        help="Dirichlet concentration of a synthetic split (small: more skew)")
    ] = 0.5,
    dp: Annotated[str, typer.Option(
        help="differential privacy: off, record (DP-SGD at each site) or site "
             "(DP-FedAvg on clipped site updates)")] = "off",
    epsilon: Annotated[float | None, typer.Option(
        help="target epsilon of the run; the noise is calibrated to it")] = None,
    delta: Annotated[float, typer.Option(help="delta of the DP guarantee")] = 1e-5,
    noise_multiplier: Annotated[float | None, typer.Option(
        help="noise standard deviation over the clip norm, instead of --epsilon")
    ] = None,
    clip_norm: Annotated[float | None, typer.Option(
        help="L2 bound of each record's gradient (record) or each site's update "
             "(site); default 1.0 for record, 0.1 for site")] = None,
    epsilon_limit: Annotated[float | None, typer.Option(
        help="limit written into simulated sites' policy files that do not "
             "exist yet (default: --epsilon)")] = None,
    privacy_dir: Annotated[Path | None, typer.Option(
        help="folder with one privacy folder (policy, ledger) per site; reuse "
             "it to keep spending the same budgets (default: <run folder>/sites)")
    ] = None,
    homomorphic: Annotated[bool, typer.Option(
        help="aggregate with CKKS homomorphic encryption: the coordinator adds "
             "ciphertexts and never sees an update or the model")] = False,
    he_value_range: Annotated[float, typer.Option(
        help="with --homomorphic: bound on each value of a site's update; "
             "values beyond it are clipped and counted")] = 1.0,
    he_precision: Annotated[float, typer.Option(
        help="with --homomorphic: largest absolute error of each value of the "
             "aggregated mean")] = 1e-6,
    secure_aggregation: Annotated[str, typer.Option(
        help="mask site updates so the coordinator sees only their weighted "
             "sum: off, secagg (every site masks with every other) or secagg+ "
             "(with about 4 log2(n) neighbours)")] = "off",
    out: Annotated[Path | None, typer.Option(
        help="run folder (default: runs/<time>-<strategy>)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="log every round to the console")
                       ] = False,
) -> None:
    """Simulate a federation in one process and compare it with baselines."""
    from prifed.data.partition import PartitionSpec
    from prifed.he.params import HomomorphicSettings
    from prifed.data.tabular import TableSpec
    from prifed.privacy.federation import PrivacyOptions
    from prifed.report import results_table, write_run_folder
    from prifed.simclock import SiteProfile
    from prifed.simulation import SimulationConfig, run_simulation

    spec = None
    if data is not None:
        if site_column is None or label is None:
            raise PriFedError("--data needs --site-column and --label")
        spec = TableSpec(site_column, label, _split(numeric), _split(categorical),
                         _split(drop) or [], label_threshold, drop_incomplete)
    elif site_column or label:
        raise PriFedError("--site-column and --label apply only with --data")
    tag = re.sub(r"[^A-Za-z0-9_.=-]+", "+", strategy)
    folder = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}"
    configure_logging(verbose, folder / "run.log")
    config = SimulationConfig(
        data=data, spec=spec, sites=_split(sites), model=model, strategy=strategy,
        rounds=rounds, local_steps=local_steps, batch_size=batch_size, lr=lr,
        sites_per_round=sites_per_round, standardize=standardize,
        baselines=baselines, seed=seed, split_seed=split_seed,
        personal_layers=_split(personal_layers) or [],
        finetune_steps=finetune_steps, finetune_lr=finetune_lr,
        site_profiles=_site_profiles(site_speed, site_availability, SiteProfile),
        step_seconds=step_seconds,
        partition=PartitionSpec(partition, partition_sites, partition_alpha,
                                seed=split_seed if split_seed is not None else seed),
        privacy=PrivacyOptions(dp, epsilon, delta, noise_multiplier, clip_norm,
                               epsilon_limit=epsilon_limit,
                               site_root=str(privacy_dir or folder / "sites"),
                               run_id=folder.name),
        homomorphic=(HomomorphicSettings(he_value_range, he_precision)
                     if homomorphic else None),
        secure_aggregation=secure_aggregation)
    config.validate()
    with_baselines = baselines and not config.privacy.enabled
    methods = len(config.strategy_specs()) + (2 if with_baselines else 0)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[metric]}"), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("training", total=rounds * methods, metric="")

        def progress(method: str, server_round: int, metrics: dict[str, float]) -> None:
            accuracy = metrics.get("accuracy", float("nan"))
            spent = (f", epsilon {metrics['epsilon']:.3g}" if "epsilon" in metrics
                     else "")
            bar.update(task, advance=1, description=f"{method} round "
                       f"{server_round}/{rounds}",
                       metric=f"mean acc {accuracy:.3f}{spent}")
            if not console.is_terminal:
                # A progress bar shows nothing in a pipe or a CI log.
                done = int(bar.tasks[0].completed)
                console.print(f"{method} round {server_round}/{rounds}: mean "
                              f"accuracy {accuracy:.3f}{spent} ({done}/"
                              f"{rounds * methods} rounds done)", highlight=False)

        result = run_simulation(config, progress)
    paths = write_run_folder(result, folder)
    table = results_table(result)
    wide = Console(width=1000)
    needed = Measurement.get(wide, wide.options, table).maximum
    Console(width=max(Console().width, 110, needed)).print(table)
    names = [p.name for p in paths.values()] + ["run.log"]
    console.print(f"run folder: {folder} ({', '.join(names)})")


def run(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status.

    PriFed errors and usage errors end in one clear message, not a traceback.
    """
    try:
        # Without standalone mode, click returns the code of a typer.Exit.
        code = app(args=argv, prog_name="prifed", standalone_mode=False)
    except PriFedError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        return 130
    except Exception as error:
        # Usage errors of the command-line parser carry their own message.
        show = getattr(error, "show", None)
        if show is None:
            raise
        show()
        return int(getattr(error, "exit_code", 2))
    finally:
        close_logging()
    return code if isinstance(code, int) else 0


register_deploy(app)
app.add_typer(data_app, name="data")
app.add_typer(he_app, name="he")
app.add_typer(privacy_app, name="privacy")


def main() -> None:
    """Entry point of the ``prifed`` script."""
    sys.exit(run())


if __name__ == "__main__":
    main()
