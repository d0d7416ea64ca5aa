"""The ``prifed privacy`` commands: policy files, ledgers, planning and the attack.

Torch, Opacus and dp-accounting are imported inside the commands, so
``prifed --help`` stays fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from prifed.errors import ConfigError

privacy_app = typer.Typer(
    help="Differential privacy: site policies, ledgers, budgets and the "
         "membership-inference check.", no_args_is_help=True, add_completion=False)
console = Console()

DeltaOption = Annotated[float, typer.Option(help="delta of the (epsilon, delta) "
                                                 "guarantee")]
AccountantOption = Annotated[str, typer.Option(help="rdp or pld (dp-accounting)")]


@privacy_app.command("init-policy")
def init_policy(
    folder: Annotated[Path, typer.Argument(help="the site's privacy folder, beside "
                                                "its data")],
    epsilon_limit: Annotated[float | None, typer.Option(
        help="most epsilon all recorded rounds may add up to; omit for no limit")
    ] = None,
    delta: DeltaOption = 1e-5,
    accountant: AccountantOption = "rdp",
    allowed_modes: Annotated[str, typer.Option(
        help="comma-separated DP modes the site accepts: record, site")
    ] = "record,site",
    min_noise_multiplier: Annotated[float, typer.Option(
        help="minimum noise multiplier the site accepts")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="replace an existing policy")
                         ] = False,
) -> None:
    """Write a site's privacy policy file (the site runs this, not the coordinator)."""
    from pydantic import ValidationError

    from prifed.privacy.policy import SitePolicy, write_policy

    modes = tuple(m.strip() for m in allowed_modes.split(",") if m.strip())
    try:
        policy = SitePolicy(epsilon_limit=epsilon_limit, delta=delta,
                            accountant=accountant,  # type: ignore[arg-type]
                            allowed_modes=modes,  # type: ignore[arg-type]
                            min_noise_multiplier=min_noise_multiplier)
    except ValidationError as error:
        first = error.errors()[0]
        raise ConfigError(f"policy field {first['loc'][0]!r} is invalid: "
                          f"{first['msg']}") from None
    path = write_policy(folder, policy, overwrite=overwrite)
    console.print(f"wrote {path}")


@privacy_app.command()
def ledger(
    folder: Annotated[Path, typer.Argument(help="the site's privacy folder")],
    site: Annotated[str | None, typer.Option(
        help="site name (default: the one the ledger records)")] = None,
) -> None:
    """Show a site's privacy ledger: every round's spend and the total so far."""
    from prifed.privacy.ledger import PrivacyLedger, format_epsilon, ledger_site
    from prifed.privacy.policy import LEDGER_FILE, load_policy

    path = folder / LEDGER_FILE
    if site is None:
        site = ledger_site(path)
    policy = load_policy(folder)
    book = PrivacyLedger(path, site)
    table = Table(title=f"Privacy ledger of site {site}")
    for column in ("recorded", "run", "round", "mode", "noise by", "sigma",
                   "sample rate", "steps", "clip", "epsilon so far"):
        table.add_column(column, justify="right")
    for entry in book.entries():
        table.add_row(entry.recorded_at, entry.run_id or "-", str(entry.server_round),
                      entry.mode, entry.noise_placement,
                      f"{entry.noise_multiplier:.4g}", f"{entry.sample_rate:.4g}",
                      str(entry.steps), f"{entry.clip_norm:g}",
                      format_epsilon(entry.epsilon_total))
    _print_table(table)
    spent = book.spent(policy)
    limit = "none" if policy.epsilon_limit is None else f"{policy.epsilon_limit:g}"
    console.print(f"spent epsilon {format_epsilon(spent)} at delta {policy.delta:g} "
                  f"({policy.accountant}); limit {limit}")


@privacy_app.command()
def plan(
    rows: Annotated[int, typer.Option(help="training records at the site")],
    rounds: Annotated[int, typer.Option(help="rounds the site takes part in")],
    local_steps: Annotated[int, typer.Option(help="DP-SGD steps per round")] = 100,
    batch_size: Annotated[float, typer.Option(help="expected batch size")] = 4,
    epsilon: Annotated[float | None, typer.Option(
        help="target epsilon: find the noise multiplier")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(
        help="noise multiplier: find the epsilon")] = None,
    delta: DeltaOption = 1e-5,
    accountant: AccountantOption = "rdp",
) -> None:
    """Plan record-level DP-SGD: noise for a target epsilon, or epsilon for a noise."""
    from prifed.privacy.accountant import GaussianEvent, calibrate_noise_multiplier, \
        compute_epsilon, sampling_rate

    if (epsilon is None) == (noise_multiplier is None):
        raise ConfigError("give exactly one of --epsilon and --noise-multiplier")
    rate = sampling_rate(batch_size, rows)
    steps = rounds * local_steps
    if epsilon is not None:
        noise_multiplier = calibrate_noise_multiplier(epsilon, delta, rate, steps,
                                                      accountant)
    assert noise_multiplier is not None
    event = GaussianEvent(noise_multiplier, rate, steps)
    spent = {name: compute_epsilon([event], delta, name) for name in ("rdp", "pld")}
    console.print(f"sampling rate {rate:.4g}, {steps} steps, noise multiplier "
                  f"{noise_multiplier:.4g}: epsilon {_fmt(spent['rdp'])} (RDP), "
                  f"{_fmt(spent['pld'])} (PLD) at delta {delta:g}")


@privacy_app.command()
def attack(
    run_folder: Annotated[Path, typer.Argument(help="folder of a prifed simulate "
                                                    "run")],
) -> None:
    """Attack a run's model: loss-threshold membership inference per site."""
    from prifed.privacy.attack import attack_run_folder

    results, report = attack_run_folder(run_folder)
    table = Table(title="Membership inference (loss threshold): training vs "
                        "held-out records")
    for column in ("site", "members", "held out", "mean loss members",
                   "mean loss held out", "attack AUC", "chance std"):
        table.add_column(column, justify="right")
    for result in results:
        auc = "n/a" if math.isnan(result.auc) else f"{result.auc:.3f}"
        table.add_row(result.site, str(result.members), str(result.non_members),
                      f"{result.member_loss:.4f}", f"{result.non_member_loss:.4f}",
                      auc, f"{result.chance_std:.3f}")
    _print_table(table)
    mode = report["privacy"].get("mode", "off")
    epsilon = report["privacy"].get("federation", {}).get("epsilon")
    console.print(f"privacy: {mode}" + (f", federation epsilon {epsilon}"
                                        if epsilon is not None else ""))
    console.print("AUC 0.5: the losses do not tell members from held-out records. "
                  "chance std: the AUC's standard deviation for a model that "
                  "leaks nothing, at these counts")
    path = run_folder / "attack.json"
    path.write_text(json.dumps(report, indent=2, allow_nan=False))
    console.print(f"wrote {path}")


def _print_table(table: Table) -> None:
    """Print a table at its natural width, wider than the terminal if need be."""
    wide = Console(width=1000)
    needed = Measurement.get(wide, wide.options, table).maximum
    Console(width=max(console.width, needed)).print(table)


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4g}"
