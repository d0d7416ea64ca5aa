"""The ``prifed he`` commands: choose parameters, create, rotate and inspect keys.

TenSEAL is imported inside each command, so ``prifed --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from prifed.errors import ConfigError
from prifed.he.params import MAX_COEFF_BITS, CKKSParams, check_params, select_params

if TYPE_CHECKING:
    from prifed.he.keys import FederationKey

he_app = typer.Typer(help="Homomorphic aggregation (CKKS): parameters and keys.",
                     no_args_is_help=True, add_completion=False)
console = Console()

SITE_FILE = "site-context.safetensors"
COORDINATOR_FILE = "coordinator-context.safetensors"

SitesOption = Annotated[int, typer.Option(
    "--sites", help="maximum number of sites whose updates one aggregate sums")]
RangeOption = Annotated[float, typer.Option(
    help="bound on each value of an update (local minus global model); values "
         "beyond it are clipped and counted")]
PrecisionOption = Annotated[float, typer.Option(
    help="largest absolute error of each value of the aggregated mean")]
WeightOption = Annotated[float, typer.Option(
    help="largest weight (training sample count) of one site")]


def _select(sites: int, value_range: float, precision: float, max_weight: float,
            degree: int | None, coeff_bits: str | None, scale_bits: int | None
            ) -> CKKSParams:
    explicit = (degree, coeff_bits, scale_bits)
    if all(value is None for value in explicit):
        return select_params(sites, value_range, precision, max_weight)
    if any(value is None for value in explicit):
        raise ConfigError("--degree, --coeff-bits and --scale-bits go together; "
                          "give all three or none")
    assert degree is not None
    assert coeff_bits is not None
    assert scale_bits is not None
    try:
        bits = tuple(int(b) for b in coeff_bits.split(","))
    except ValueError:
        raise ConfigError("--coeff-bits must be comma-separated integers such as "
                          f"47,47; got {coeff_bits!r}") from None
    params = CKKSParams(degree, bits, scale_bits, sites, value_range, max_weight,
                        precision)
    check_params(params)
    return params


def _describe(params: CKKSParams) -> list[str]:
    degree = params.poly_modulus_degree
    bits = params.coeff_mod_bit_sizes
    bytes_per_value = 16 * degree * len(bits[:-1]) / params.slots
    error = params.mean_error_bound(params.num_sites, 1.0)
    return [
        f"polynomial degree    {degree} ({params.slots} values per ciphertext)",
        (f"coefficient moduli   {list(bits)} bits, special prime last; "
         f"{sum(bits)} of the {MAX_COEFF_BITS[degree]} bits allowed for 128-bit "
         "security"),
        f"scale                2^{params.scale_bits}",
        f"sites per aggregate  at most {params.num_sites}",
        (f"value range          ±{params.value_range:g}; max weight "
         f"{params.max_weight:g}"),
        (f"error bound (mean)   {error:.2g} for the requested {params.precision:g}, "
         "when weights total at least 1"),
        (f"ciphertext size      at most {bytes_per_value:.0f} bytes per value "
         f"({bytes_per_value / 4:.0f}x float32) before compression"),
    ]


@he_app.command("params")
def params_command(
    sites: SitesOption,
    value_range: RangeOption = 1.0,
    precision: PrecisionOption = 1e-6,
    max_weight: WeightOption = 10_000.0,
) -> None:
    """Show the CKKS parameters PriFed would choose, or why none fit."""
    params = _select(sites, value_range, precision, max_weight, None, None, None)
    for line in _describe(params):
        console.print(line, highlight=False)


@he_app.command()
def keygen(
    sites: SitesOption,
    out: Annotated[Path, typer.Option(help="folder for the two context files")],
    value_range: RangeOption = 1.0,
    precision: PrecisionOption = 1e-6,
    max_weight: WeightOption = 10_000.0,
    run: Annotated[str, typer.Option(help="label of the run this key serves")] = "",
    degree: Annotated[int | None, typer.Option(
        help="polynomial degree, to override the choice (with --coeff-bits and "
             "--scale-bits)")] = None,
    coeff_bits: Annotated[str | None, typer.Option(
        help="comma-separated prime sizes in bits, special prime last")] = None,
    scale_bits: Annotated[int | None, typer.Option(
        help="scale as a power of two")] = None,
    force: Annotated[bool, typer.Option(
        help="overwrite existing context files")] = False,
) -> None:
    """Create the federation's CKKS key: a site file and a coordinator file."""
    from prifed.he.keys import create_federation_key

    params = _select(sites, value_range, precision, max_weight, degree, coeff_bits,
                     scale_bits)
    key = create_federation_key(params, run)
    _write_pair(key, out, force)


@he_app.command()
def rotate(
    site_context: Annotated[Path, typer.Option(
        help="the current site context file")],
    out: Annotated[Path, typer.Option(help="folder for the new context files")],
    run: Annotated[str, typer.Option(help="label of the new run")] = "",
    sites: Annotated[int | None, typer.Option(
        "--sites", help="new maximum number of sites per aggregate (default: "
                        "unchanged)")] = None,
    force: Annotated[bool, typer.Option(
        help="overwrite existing context files")] = False,
) -> None:
    """Create a new secret key for a new run, keeping the parameters."""
    from prifed.he.keys import read_key_file, rotate_key

    old = read_key_file(site_context)
    params = old.params
    if sites is not None and sites != params.num_sites:
        params = select_params(sites, params.value_range, params.precision,
                               params.max_weight)
    key = rotate_key(old, run, params)
    _write_pair(key, out, force)
    console.print(f"replaces key {old.key_id}: delete the old site context at every "
                  "site once the new run starts", highlight=False)


@he_app.command()
def inspect(path: Annotated[Path, typer.Argument(help="a context file")]) -> None:
    """Show a context file's kind, key id, parameters and secret-key status."""
    from prifed.he.keys import read_key_file

    key = read_key_file(path)
    secret = "yes: keep it at the sites only" if key.has_secret_key else "no"
    console.print(f"kind                 {key.kind} context", highlight=False)
    console.print(f"secret key           {secret}", highlight=False)
    console.print(f"key id               {key.key_id}", highlight=False)
    if key.previous_key_id:
        console.print(f"replaces key         {key.previous_key_id}", highlight=False)
    console.print(f"run, created         {key.run or '-'}, {key.created}",
                  highlight=False)
    for line in _describe(key.params):
        console.print(line, highlight=False)


@he_app.command("export-coordinator")
def export_coordinator(
    site_context: Annotated[Path, typer.Option(help="a site context file")],
    out: Annotated[Path, typer.Option(help="coordinator context file to write")],
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
) -> None:
    """Write the coordinator context (no secret key) derived from a site context."""
    from prifed.he.keys import coordinator_context_bytes, read_key_file, write_key_file

    key = read_key_file(site_context)
    _reject_overwrite([out], force)
    write_key_file(out, coordinator_context_bytes(key))
    console.print(f"coordinator context for key {key.key_id}: {out}", highlight=False)


def _reject_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"{', '.join(existing)} already exists; pass --force to "
                          "overwrite (the old key is lost)")


def _write_pair(key: FederationKey, out: Path, force: bool) -> None:
    from prifed.he.keys import (
        coordinator_context_bytes,
        site_context_bytes,
        write_key_file,
    )

    site_path, coordinator_path = out / SITE_FILE, out / COORDINATOR_FILE
    _reject_overwrite([site_path, coordinator_path], force)
    write_key_file(site_path, site_context_bytes(key))
    write_key_file(coordinator_path, coordinator_context_bytes(key))
    for line in _describe(key.params):
        console.print(line, highlight=False)
    console.print(f"key id {key.key_id}", highlight=False)
    console.print(f"site context (secret, mode 0600): {site_path}\n"
                  "  copy it to every site over a channel the coordinator cannot "
                  "read; never to the coordinator", highlight=False)
    console.print(f"coordinator context (no secret key): {coordinator_path}",
                  highlight=False)
