"""The ``dkm`` command: where config, io, cluster, monitor, engine and report meet."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import click

import dkm
from dkm import covariance
from dkm._typing import NAN_POLICIES
from dkm.config import load_config
from dkm.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes: success, a failure while running, bad config or input.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def handle_errors(fn: F) -> F:
    """Exit 2 with one paragraph for a :class:`~dkm.errors.UserError` (bad config, input,
    location or data), 1 for anything else, which is a failure of dkm's own or of what it
    runs on; the traceback with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo(
                "dkm: interrupted; nothing was written in place of the previous output", err=True
            )
            sys.exit(130)
        except UserError as e:  # bad config, input, location or data: the user's to fix
            if debug:
                traceback.print_exc()
            click.echo(f"dkm: error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except Exception as e:
            if debug:
                traceback.print_exc()
            click.echo(
                f"dkm: failed: {type(e).__name__}: {e} (run with --debug for the traceback)",
                err=True,
            )
            sys.exit(EXIT_FAILED)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(dkm.__version__, prog_name="dkm")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(debug: bool) -> None:
    """k-means and Gaussian mixtures on Dask, from one YAML config."""
    # distributed sets up its own logging when first imported: its loggers' handler, which
    # an embedded cluster silences, and no propagation to the root. Imported after the
    # root's handler below, its INFO lines would reach the root's handler, past --quiet.
    import distributed  # noqa: F401

    logging.basicConfig(level=logging.WARNING)
    # Batch schedulers stop jobs with SIGTERM: unwind like Ctrl-C, so temporary outputs
    # are removed and the previous output stays in place.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config value, e.g. --set model.n_clusters=32 (repeatable).",
)
_overwrite_option = click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an earlier dkm output at the output path (never anything else).",
)
_quiet_option = click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
_log_format_option = click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="json: one JSON object per line, for batch schedulers.",
)


def _load(config: str, overrides: tuple[str, ...], overwrite: bool) -> Any:
    cfg = load_config(config, list(overrides))
    if overwrite:
        output = cfg.output.model_copy(update={"overwrite": True})
        cfg = cfg.model_copy(update={"output": output})
    return cfg


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
@_overwrite_option
@_quiet_option
@click.option(
    "--resume", is_flag=True, help="Continue from the checkpoint an interrupted run of CONFIG left."
)
@_log_format_option
@handle_errors
def run(
    config: str,
    overrides: tuple[str, ...],
    overwrite: bool,
    quiet: bool,
    resume: bool,
    log_format: str,
) -> None:
    """Fit the model CONFIG describes and write its outputs."""
    from dkm.job import run_job
    from dkm.monitor import Progress

    cfg = _load(config, overrides, overwrite)
    logging.getLogger("distributed").setLevel(cfg.runtime.log_level)
    progress = Progress("pending", fmt=log_format, quiet=quiet)  # type: ignore[arg-type]
    result = run_job(cfg, progress=progress, config_source=config, resume=resume)
    if not quiet and log_format == "text":
        click.echo(f"wrote {result.output}")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
@click.option(
    "--update",
    is_flag=True,
    help="Merge the new data's statistics into the current model's (decayed by "
    "registry.half_life) and take one M-step, instead of refitting.",
)
@_overwrite_option
@_quiet_option
@_log_format_option
@handle_errors
def recluster(
    config: str,
    overrides: tuple[str, ...],
    update: bool,
    overwrite: bool,
    quiet: bool,
    log_format: str,
) -> None:
    """Refit the registry's current model on new data; promote it if the guards pass.

    Exit code 3: the new model was refused by a guard (kept as a candidate version,
    current unchanged).
    """
    from dkm.monitor import Progress
    from dkm.recluster import EXIT_REFUSED
    from dkm.recluster import recluster as run_recluster

    cfg = _load(config, overrides, overwrite)
    logging.getLogger("distributed").setLevel(cfg.runtime.log_level)
    progress = Progress("pending", fmt=log_format, quiet=quiet)  # type: ignore[arg-type]
    result = run_recluster(cfg, update=update, progress=progress, config_source=config)
    if result.promoted:
        if not quiet and log_format == "text":
            click.echo(f"v{result.version} is current ({result.mode})")
        return
    if quiet:  # otherwise the job's "refused" line has said it, with the reasons
        click.echo(
            f"dkm: refused: v{result.version} kept as a candidate, v{result.current} stays "
            f"current: {'; '.join(result.reasons)}",
            err=True,
        )
    sys.exit(EXIT_REFUSED)


@main.group()
def models() -> None:
    """The versions in a config's model registry (its registry section)."""


def _version_number(text: str) -> int:
    digits = text[1:] if text[:1] in ("v", "V") else text
    if not digits.isdigit() or int(digits) < 1:
        raise click.BadParameter(f"expected a version like 3 or v3, got {text!r}")
    return int(digits)


def _open_registry(config: str, overrides: tuple[str, ...]) -> Any:
    from dkm.recluster import registry_from_config

    return registry_from_config(load_config(config, list(overrides)))


@models.command("list")
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
@click.option("--json", "as_json", is_flag=True, help="Print the versions as JSON.")
@handle_errors
def models_list(config: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """The versions, oldest first; * marks the current one."""
    registry = _open_registry(config, overrides)
    current = registry.current()
    versions = registry.versions()
    if as_json:
        rows = [{**v.info, "current": v.number == current} for v in versions]
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not versions:
        click.echo(f"no versions in {registry}")
        return
    header = (" ", "version", "created", "decision", "fit", "model", "objective", "data")
    table = [header, *(_version_row(v.info, v.number == current, v.number) for v in versions)]
    widths = [max(len(r[c]) for r in table) for c in range(1, len(header) - 1)]
    for mark, *cells, last in table:
        padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=True)]
        click.echo(f"{mark} " + "  ".join([*padded, last]).rstrip())


#: How a version was made (its ``mode``), in the listing's words.
_HOW = {"first": "first fit", "refit": "refit", "update": "update"}


def _version_row(info: dict[str, Any], current: bool, number: int) -> tuple[str, ...]:
    """One line of ``dkm models list``: the model's kind from its record (``model``, or
    the objective's name for versions written before it was recorded)."""
    described = info.get("model") or {}
    if described:
        ct = described.get("covariance_type")
        unit = ct in covariance.TYPES and covariance.TYPES[ct].unit
        kind = "kmeans" if unit and described.get("assignment") == "hard" else "gmm"
        kind += f" {ct}" if kind == "gmm" else ""
        kind += f" k={described.get('k')}"
    else:
        kind = {"inertia": "kmeans"}.get(info.get("objective_name", ""), "gmm")
    objective = info.get("objective")
    value = "-" if objective is None else format(objective, ".8g")
    return (
        "*" if current else " ",
        f"v{number}",
        str(info.get("created", "-")),
        # a first version becomes current with no guard to pass: "first" twice said nothing
        "promoted" if info.get("decision") == "first" else str(info.get("decision", "-")),
        _HOW.get(info.get("mode", ""), str(info.get("mode", "-"))),
        kind,
        f"{info.get('objective_name', 'objective')} {value}",
        str(info.get("data", "")),
    )


@models.command("show")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("version", required=False)
@_set_option
@handle_errors
def models_show(config: str, version: str | None, overrides: tuple[str, ...]) -> None:
    """One version (default: the current one): its record, drift and where it is."""
    registry = _open_registry(config, overrides)
    if version is None:
        number = registry.current()
        if number is None:
            from dkm.registry import RegistryError

            raise RegistryError(f"{registry} has no current version: name one, e.g. v1")
    else:
        number = _version_number(version)
    v = registry.get(number)
    click.echo(
        json.dumps(
            {**v.info, "current": number == registry.current(), "model": v.model_url},
            indent=2,
            default=str,
        )
    )


@models.command("promote")
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("version")
@_set_option
@handle_errors
def models_promote(config: str, version: str, overrides: tuple[str, ...]) -> None:
    """Make VERSION current (a refused candidate too: the guards are not rechecked)."""
    registry = _open_registry(config, overrides)
    number = _version_number(version)
    before = registry.promote(number)
    was = "none" if before is None else f"v{before}"
    click.echo(f"v{number} is current (was {was})")


@models.command("rollback")
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
@handle_errors
def models_rollback(config: str, overrides: tuple[str, ...]) -> None:
    """Make the previously current version current again."""
    registry = _open_registry(config, overrides)
    before, after = registry.rollback()
    click.echo(f"v{after} is current (was v{before})")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@_set_option
@handle_errors
def validate(config: str, overrides: tuple[str, ...]) -> None:
    """Check CONFIG without running it."""
    cfg = load_config(config, list(overrides))
    m = cfg.model
    click.echo(
        f"{config}: ok — {m.mode} ({m.resolved('covariance_type')}, {m.resolved('assignment')}) "
        f"k={m.n_clusters} on {cfg.data.kind} data, cluster {cfg.cluster.kind}, "
        f"output {cfg.output.path}"
    )


@main.command()
@click.option(
    "--model",
    "model_path",
    required=True,
    help="A saved model, or the output folder of dkm run (its model/).",
)
@click.option("--data", required=True, help="Points: a zarr store/URL or a .npy file.")
@click.option("--array", default=None, help="Array path inside the zarr group.")
@click.option("--out", required=True, help="Output zarr store for the labels.")
@click.option("--scheduler", default=None, help="Dask scheduler address (default: in-process).")
@click.option(
    "--nan-policy",
    type=click.Choice(NAN_POLICIES),
    default=None,
    help="Rows with NaN or infinity: raise (exit 2 naming the row) or drop (label -1). "
    "Default: the model's, as fitted (data.nan_policy).",
)
@_overwrite_option
@handle_errors
def predict(
    model_path: str,
    data: str,
    array: str | None,
    out: str,
    scheduler: str | None,
    nan_policy: str | None,
    overwrite: bool,
) -> None:
    """Label new data with a saved model."""
    from dkm import io
    from dkm.models import load_model

    model = load_model(io.find_model(model_path))
    if nan_policy is not None:
        model.set_params(nan_policy=nan_policy)
    points = io.open_path(data, array, array_option="--array")
    io.claim_output(out, overwrite=overwrite)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_nonfinite_remedy("label them -1 with --nan-policy drop"))
        if scheduler:
            from dkm.cluster import Hints, connect
            from dkm.config import AddressClusterConfig

            hints = Hints.command_line("--scheduler", "leave out --scheduler to run in-process")
            config = AddressClusterConfig(kind="address", address=scheduler)
            stack.enter_context(connect(config, hints=hints))
        labels = model.predict(points.X)
        with io.AtomicOutput(out, command="predict", overwrite=overwrite) as tmp:
            io.write_array(labels, tmp, "labels")
    click.echo(f"wrote {out} ({points.X.shape[0]:,} labels)")


@contextlib.contextmanager
def _nonfinite_remedy(remedy: str) -> Any:
    """NaN/inf errors say what to do on the command line, not in Python."""
    from dkm.engine import NonFiniteInputError

    try:
        yield
    except NonFiniteInputError as e:
        raise e.with_remedy(remedy) from None


@main.command("make-data")
@click.option("--n", type=click.IntRange(min=1), required=True, help="Number of points.")
@click.option("--d", type=click.IntRange(min=1), required=True, help="Number of features.")
@click.option("--k", type=click.IntRange(min=1), required=True, help="Number of clusters.")
@click.option("--out", required=True, help="Output zarr store (local path or fsspec URL).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--chunk-rows", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option(
    "--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True
)
@click.option(
    "--spread",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Scale of the cluster centres.",
)
@_overwrite_option
@handle_errors
def make_data(
    n: int,
    d: int,
    k: int,
    out: str,
    seed: int,
    chunk_rows: int,
    dtype: str,
    spread: float,
    overwrite: bool,
) -> None:
    """Write a synthetic dataset (Gaussian blobs) to zarr, in parallel and chunked."""
    from dkm import io

    io.make_data(
        out,
        n,
        d,
        k,
        seed=seed,
        chunk_rows=chunk_rows,
        dtype=dtype,
        spread=spread,
        overwrite=overwrite,
    )
    click.echo(f"wrote {out}: points ({n:,} x {d} {dtype}), labels_true")


@main.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
@handle_errors
def info(model: str, as_json: bool) -> None:
    """What a saved MODEL is (a model, or the output folder of dkm run)."""
    from dkm import io

    model = io.find_model(model)
    meta = io.read_model_metadata(model)
    if as_json:
        click.echo(json.dumps(meta, indent=2, default=str))
        return
    user = meta.get("metadata") or {}
    cfg = user.get("config") or {}
    params = meta.get("params", {})
    lines = [
        f"model: {model}",
        f"kind: {meta.get('kind')} (dkm {meta.get('dkm_version')})",
        f"mode: {cfg.get('model', {}).get('mode', '-')}",
        f"k: {params.get('n_clusters', params.get('n_components'))}, "
        f"d: {meta.get('n_features_in_')}",
        f"covariance: {params.get('covariance_type', 'identity')}",
        f"iterations: {meta.get('n_iter_')}, converged: {meta.get('converged_')}",
        f"objective: {meta.get('inertia_', meta.get('lower_bound_'))}",
        f"data: {user.get('data', '-')}",
        f"data fingerprint: {user.get('data_fingerprint', '-')}",
        f"config: {user.get('config_source', '-')}",
    ]
    click.echo("\n".join(lines))


@main.command()
@click.option("--scheduler", required=True, help="Address of the scheduler the jobs run on.")
@handle_errors
def status(scheduler: str) -> None:
    """Progress of the dkm jobs running (or run) on a scheduler."""
    from dkm.cluster import Hints, connect
    from dkm.config import AddressClusterConfig
    from dkm.monitor import job_status

    config = AddressClusterConfig(kind="address", address=scheduler)
    with connect(config, hints=Hints.command_line("--scheduler")) as client:
        jobs = job_status(client)
    if not jobs:
        click.echo(f"no dkm jobs have reported to {scheduler}")
        return
    for job, state in jobs.items():
        last = state.get("last_iteration")
        latest = state["latest"]
        where = (
            f"iteration {last['iteration']}, objective {last['objective']:.8g}"
            if last
            else "no iteration yet"
        )
        click.echo(f"{job}: {latest.get('event')} at {latest.get('time')}; {where}")


if __name__ == "__main__":
    main()
