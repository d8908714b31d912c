"""``annsample`` commands. Each loads its inputs and calls one library function."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from annsample.config import BATCH_SAMPLER_NAMES, SAMPLER_NAMES
from annsample.errors import AnnsampleError


def _user_errors(func):
    """Print a user error as one line and exit 2 (no traceback); library bugs still raise."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except AnnsampleError as error:
            # one line, even where a message quotes a multi-line parser error
            click.echo(f"error: {' '.join(str(error).split())}", err=True)
            sys.exit(2)

    return wrapper


class _OneLineErrors(click.Group):
    """A click group whose usage errors (unknown flag, bad value, missing argument) print one
    ``error:`` line naming the help to read, exit 2, like every other user error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as error:
            command = error.ctx.command_path if error.ctx is not None else self.name
            message = " ".join(error.format_message().split())
            click.echo(f"error: {message} (see '{command} --help')", err=True)
            sys.exit(2)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


def _check_writable(path: Path | None, flag: str) -> None:
    """Refuse an output file whose folder does not exist, before any work is done."""
    if path is not None and not path.parent.is_dir():
        raise click.BadParameter(
            f"folder {path.parent} does not exist; create it or write elsewhere", param_hint=flag
        )


def _file_option(flag: str, dest: str, help: str | None, required: bool = False):
    """An output file option (a Path, not a folder; None when not given)."""
    path = click.Path(dir_okay=False, path_type=Path)
    return click.option(flag, dest, type=path, default=None, required=required, help=help)


def _json_option(help: str | None = "Write the records as a JSON list.", required: bool = False):
    """``--json FILE`` (into ``json_path``)."""
    return _file_option("--json", "json_path", help, required)


def _overrides_option(help: str):
    """``--set KEY=VALUE`` (repeatable, into ``overrides``)."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=help)


def _config_option(help: str):
    """``--config FILE`` (into ``config_path``)."""
    path = click.Path(dir_okay=False, path_type=Path)
    return click.option("--config", "config_path", type=path, default=None, help=help)


def _out_option(help: str, required: bool = False):
    """``--out DIR`` (into ``out_dir``)."""
    path = click.Path(path_type=Path)
    return click.option("--out", "out_dir", type=path, default=None, required=required, help=help)


def _count_option(*names: str, default: int, help: str | None = None, minimum: int = 1):
    """A whole-number option of at least ``minimum`` with a shown default."""
    kind = click.IntRange(min=minimum)
    return click.option(*names, default=default, type=kind, show_default=True, help=help)


def _write_json(path: Path | None, value) -> None:
    """``value`` as indented JSON into ``path`` (nothing when None)."""
    if path is not None:
        path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _setup_logging(verbose: bool) -> None:
    rank = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""  # set by torchrun
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {rank}%(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # faiss logs at INFO which CPU build it tried to load; only its warnings matter here
    logging.getLogger("faiss").setLevel(logging.WARNING)


@click.group(
    "annsample", cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="annsample")
def main(verbose: bool) -> None:
    """annsample: GenNi model-aware negative sampling for sequential recommenders."""
    _setup_logging(verbose)


@main.command()
@_config_option(
    "YAML run config (default: built-in defaults = SASRec + uniform BCE on data/Beauty.txt)."
)
@_overrides_option("Override a config key, e.g. --set train.epochs=5 (repeatable).")
@_out_option("Run folder (default runs/<date>-<name>).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty run folder.")
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(path_type=Path),
    default=None,
    metavar="RUN_DIR",
    help="Continue an interrupted run from its newest checkpoint (exactly, on CPU), with the run's "
    "config.yaml unless --config is given.",
)
@click.option(
    "--catalog-size",
    default=None,
    metavar="N",
    help="Train on a synthetic catalog of N items (e.g. 100k, 1M) instead of the config's dataset; "
    "from 100k items on, the ANN sampler and sparse embeddings are switched on (--set still wins).",
)
@_count_option(
    "--nproc",
    default=1,
    help="Train on N processes with DDP (gloo on CPU, NCCL on GPUs), launched through torch's "
    "elastic launcher; train.batch_size stays the global batch.",
)
@_user_errors
def train(
    config_path: Path | None,
    overrides: tuple[str, ...],
    out_dir: Path | None,
    overwrite: bool,
    resume_dir: Path | None,
    catalog_size: str | None,
    nproc: int,
) -> None:
    """Train a model and write config, metrics, checkpoint and results into the run folder."""
    from annsample.config import catalog_overrides, load_config
    from annsample.run import default_run_dir, run_config_path
    from annsample.synthetic import parse_size
    from annsample.train import train as run_training

    if resume_dir is not None:
        given = {
            "--out": out_dir is not None,
            "--overwrite": overwrite,
            "--catalog-size": catalog_size,
        }
        clashes = [flag for flag, value in given.items() if value]
        if clashes:
            raise click.UsageError(
                f"--resume continues RUN_DIR in place, on its own data; drop {', '.join(clashes)}"
            )
        # the run's own config.yaml lists every key: settings its sampler ignores are not errors
        config = load_config(
            config_path or run_config_path(resume_dir), overrides, check_ignored=bool(config_path)
        )
        if nproc > 1:
            return _launch(nproc, config_path, overrides, resume_dir, resume=True)
        results = run_training(config, resume_dir, resume=True)
        out = resume_dir
    else:
        preset = catalog_overrides(parse_size(catalog_size)) if catalog_size is not None else ()
        config = load_config(config_path, tuple(overrides), preset=preset)
        out = out_dir or default_run_dir(config)
        if nproc > 1:
            return _launch(nproc, config_path, overrides, out, overwrite=overwrite)
        results = run_training(config, out, overwrite=overwrite)
    if os.environ.get("RANK", "0") != "0":
        return None  # under torchrun, rank 0 reports
    click.echo(f"run folder: {out}")
    click.echo(_format_metrics("test", results["test"]))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--stage", type=click.Choice(["valid", "test", "both"]), default="both", show_default=True
)
@_json_option("Also write the metrics as JSON.")
@_user_errors
def evaluate(run_dir: Path, stage: str, json_path: Path | None) -> None:
    """Full-ranking HR/NDCG@5/10/20 of a trained run's best checkpoint."""
    from annsample.run import evaluate_run

    _check_writable(json_path, "--json")
    metrics = evaluate_run(run_dir, stages=("valid", "test") if stage == "both" else (stage,))
    for name, values in metrics.items():
        click.echo(_format_metrics(name, values))
    _write_json(json_path, metrics)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--stage", type=click.Choice(["valid", "test"]), default="test", show_default=True)
@click.option(
    "--time-to",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    metavar="NDCG",
    help="Add a column: training seconds (median over seeds, validations excluded) until "
    "validation NDCG@10 first reached NDCG, e.g. --time-to 0.05.",
)
@_user_errors
def report(run_dirs: tuple[Path, ...], stage: str, time_to: float | None) -> None:
    """Markdown table of finished runs (runs with the same name are averaged over seeds)."""
    from annsample.report import results_table

    click.echo(results_table(list(run_dirs), stage, time_to), nl=False)


@main.command()
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@_file_option(
    "--png", "png", "Also plot validation NDCG@10 against training seconds into this file."
)
@click.option(
    "--counts",
    type=(str, click.IntRange(min=1)),
    default=None,
    metavar="N_ITEMS TEST_USERS",
    help="Also score the model-free transition-count reference on the test users of a "
    "--catalog-size N_ITEMS run (e.g. --counts 100k 2000), as one JSON line.",
)
@_user_errors
def quality(run_dirs: tuple[Path, ...], png: Path | None, counts: tuple[str, int] | None) -> None:
    """Markdown quality table of synthetic-catalog runs (test NDCG/HR@10 against the catalog's
    oracle, steps, training seconds)."""
    from annsample.quality import plot_curves, quality_table, read_run, transition_count_metrics
    from annsample.synthetic import parse_size

    if png is not None and not run_dirs:
        raise click.UsageError("--png plots the runs named; name at least one run folder")
    if not run_dirs and counts is None:
        raise click.UsageError("name finished run folders, or --counts N_ITEMS TEST_USERS")
    _check_writable(png, "--png")
    n_items = parse_size(counts[0]) if counts is not None else None
    runs = [read_run(run) for run in run_dirs]
    if runs:
        click.echo(quality_table(runs))
    if png is not None:
        plot_curves(runs, png)
    if counts is not None:
        metrics = transition_count_metrics(n_items, counts[1])
        click.echo(json.dumps({"transition_counts": metrics}))


@main.command()
@click.argument("runs", nargs=-1, required=True, metavar="[LABEL=]RUN_DIR...")
@_file_option("--png", "png", "The plot to write.", required=True)
@click.option(
    "--reference",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A CSV of epoch,valid_ndcg10 (e.g. a published training log) drawn in the by-epoch panel.",
)
@click.option("--reference-label", default="reference", show_default=True)
@_user_errors
def curves(runs: tuple[str, ...], png: Path, reference: Path | None, reference_label: str) -> None:
    """Plot validation NDCG@10 against epochs and training seconds for run folders, finished or
    stopped (only metrics.jsonl is read)."""
    from annsample.curves import plot_runs, reference_curve, run_curve

    _check_writable(png, "--png")
    labelled = []
    for item in runs:
        label, sep, folder = item.rpartition("=")
        labelled.append((label if sep else Path(folder).name, run_curve(folder)))
    ref = (reference_label, reference_curve(reference)) if reference is not None else None
    plot_runs(labelled, png, ref)
    click.echo(f"wrote {png}")


@main.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option(
    "--nlist", type=click.IntRange(min=1), default=None, help="IVF lists (default ~sqrt(N))."
)
@click.option(
    "--nprobe",
    type=click.IntRange(min=1),
    default=None,
    help="Lists probed per query when serving.",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUT_DIR.")
@_user_errors
def export_command(
    run_dir: Path, out_dir: Path, nlist: int | None, nprobe: int | None, overwrite: bool
) -> None:
    """Write a finished run's model, item embeddings, FAISS index and manifest for serving."""
    from annsample.export import export_run

    manifest = export_run(run_dir, out_dir, nlist=nlist, nprobe=nprobe, overwrite=overwrite)
    index = manifest["index"]
    click.echo(
        f"export folder: {out_dir} ({manifest['n_items']} items, nlist {index['nlist']}, "
        f"nprobe {index['nprobe']}, index recall@10 {index['recall@10']:.3f})"
    )


@main.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option(
    "--history",
    required=True,
    metavar="ID,ID,...",
    help="The user's items, oldest first, comma-separated (e.g. 5,17,42).",
)
@_count_option("-k", "k", default=10, help="How many items.")
@click.option(
    "--nprobe", type=click.IntRange(min=1), default=None, help="Override the index's nprobe."
)
@click.option("--scores", "with_scores", is_flag=True, help="Print 'id score' lines instead.")
@_count_option(
    "--threads",
    default=1,
    help="torch and FAISS threads (one query gains nothing from more, and waits for busy cores).",
)
@_user_errors
def recommend(
    export_dir: Path, history: str, k: int, nprobe: int | None, with_scores: bool, threads: int
) -> None:
    """Print the top-k item ids for a history (history items excluded) from an export folder."""
    import time

    import faiss
    import torch

    from annsample.export import Recommender, parse_history

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    recommender = Recommender.load(export_dir)
    loaded = time.perf_counter()
    if nprobe is not None:
        recommender.nprobe = nprobe
    result = recommender.recommend(parse_history(history, recommender.labels is not None), k)
    done = time.perf_counter()
    logging.getLogger(__name__).info(
        "loaded in %.0f ms, recommended in %.1f ms", 1e3 * (loaded - start), 1e3 * (done - loaded)
    )
    if with_scores:
        for item, score in zip(result.ids, result.scores.tolist(), strict=True):
            click.echo(f"{item} {score:.4f}")
    else:
        click.echo(" ".join(map(str, result.ids)))


class _DefaultRunGroup(click.Group):
    """A group that runs its ``run`` subcommand when the first argument names no subcommand, so
    ``annsample ablate --config ... --grid ...`` and ``annsample ablate report DIR`` both work."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@main.group(cls=_DefaultRunGroup)
def ablate() -> None:
    """Ablation grids (e.g. refresh frequency): `annsample ablate [run] --config FILE --grid
    KEY=V1,V2 --out DIR` trains every combination; `annsample ablate report DIR` rebuilds the
    tables and plots from the finished runs."""


@ablate.command("run")
@_config_option("Base YAML run config.")
@click.option(
    "--grid",
    multiple=True,
    required=True,
    metavar="KEY=V1,V2,...",
    help="A config key and the values to try (repeatable: every combination is run). "
    "sampler.index.refresh_every also takes never, epoch and adaptive.",
)
@click.option(
    "--seeds",
    default=None,
    metavar="S1,S2,...",
    help="Run every combination once per seed, e.g. --seeds 0,1,2 (default: the config's seed).",
)
@_count_option(
    "--jobs",
    default=1,
    help="Runs trained at once, each in its own process with cores/jobs torch threads.",
)
@_overrides_option("Overrides for every run.")
@_out_option("Folder for the runs.", required=True)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Train every run from scratch (default: skip finished runs, resume interrupted ones).",
)
@click.option(
    "--catalog-size",
    default=None,
    metavar="N",
    help="Every run on a synthetic catalog of N items (e.g. 100k) with the settings of "
    "train --catalog-size N; --config and --set still win.",
)
@_user_errors
def ablate_run(
    config_path: Path | None,
    grid: tuple[str, ...],
    seeds: str | None,
    jobs: int,
    overrides: tuple[str, ...],
    out_dir: Path,
    overwrite: bool,
    catalog_size: str | None,
) -> None:
    """Train (or resume) one run per combination of the grid, then write results.csv,
    results.json, summary.md and plots into --out; exits 1 if any run failed."""
    from annsample.ablation import failures_text, outcomes_table, parse_seeds, run_ablation
    from annsample.ablation_report import write_report
    from annsample.config import catalog_overrides
    from annsample.synthetic import parse_size

    preset = catalog_overrides(parse_size(catalog_size)) if catalog_size is not None else ()
    outcomes = run_ablation(
        config_path,
        grid,
        out_dir,
        seeds=parse_seeds(seeds) if seeds is not None else None,
        overrides=overrides,
        jobs=jobs,
        overwrite=overwrite,
        preset=preset,
    )
    click.echo(outcomes_table(outcomes), nl=False)
    failed = failures_text(outcomes)
    click.echo(failed, err=True, nl=False)
    if any(o.state != "failed" for o in outcomes):
        click.echo()
        click.echo(write_report(out_dir), nl=False)
        click.echo(f"tables and plots: {out_dir}")
    if failed:
        click.get_current_context().exit(1)


@ablate.command("report")
@click.argument("out_dir", type=click.Path(path_type=Path), metavar="DIR")
@_user_errors
def ablate_report(out_dir: Path) -> None:
    """Rebuild results.csv, results.json, summary.md and the plots of an ablation folder from its
    finished runs, and print the summary."""
    from annsample.ablation_report import write_report

    click.echo(write_report(out_dir), nl=False)


@main.group()
def bench() -> None:
    """Benchmarks (sampler quality and speed, index search and refresh, distributed training)."""


# the samplers the benches time (exact stands for exact_gumbel too; the in-batch ones draw from a
# training batch's positives, which the benches' probe queries do not have)
_MODEL_SAMPLERS = [
    name for name in SAMPLER_NAMES if name != "exact_gumbel" and name not in BATCH_SAMPLER_NAMES
]


def _samplers_option(help: str):
    """``--sampler NAME`` (repeatable, into ``samplers``)."""
    choice = click.Choice(_MODEL_SAMPLERS)
    return click.option("--sampler", "samplers", multiple=True, type=choice, help=help)


@bench.command("samplers")
@click.argument("run_dir", type=click.Path(path_type=Path))
@_json_option()
@_samplers_option("Samplers to run (default: all).")
@_count_option("--queries", default=256, help="Probe queries timed per call.")
@_count_option("--tv-queries", default=32, help="Probe queries for the TV distance.")
@_count_option(
    "--draws",
    default=100_000,
    help="Draws per query for empirical TV (samplers without a closed form).",
)
@_count_option("--repeats", default=5, help="Timing repeats (the median is reported).")
@_count_option(
    "--softmax-negatives", default=128, help="Negatives per query for the sampled-softmax gap."
)
@_overrides_option("Sampler setting to change, e.g. --set sampler.candidates=1000 (repeatable).")
@_user_errors
def bench_samplers_command(
    run_dir: Path,
    json_path: Path | None,
    samplers: tuple[str, ...],
    queries: int,
    tv_queries: int,
    draws: int,
    repeats: int,
    softmax_negatives: int,
    overrides: tuple[str, ...],
) -> None:
    """Speed, TV distance to exact GenNi, hardness, and sampled-softmax gap of each sampler on a
    trained run."""
    from annsample.bench.samplers import BENCH_SAMPLERS, bench_samplers, records_table

    _check_writable(json_path, "--json")
    records = bench_samplers(
        run_dir,
        samplers or BENCH_SAMPLERS,
        queries,
        tv_queries,
        draws,
        repeats,
        softmax_negatives=softmax_negatives,
        overrides=overrides,
    )
    click.echo(records_table(records), nl=False)
    _write_json(json_path, records)


@bench.command("stall")
@click.option(
    "--catalog-size",
    default="1M",
    show_default=True,
    help="Synthetic catalog size (e.g. 100k, 1M).",
)
@click.option("--steps", default=400, show_default=True, help="Training steps per mode.")
@click.option(
    "--refresh-every", default=100, show_default=True, help="Steps between index refreshes."
)
@_overrides_option("Extra config overrides.")
@_out_option("Keep the three runs here.")
@_json_option(help=None)
@_user_errors
def bench_stall_command(
    catalog_size: str,
    steps: int,
    refresh_every: int,
    overrides: tuple[str, ...],
    out_dir: Path | None,
    json_path: Path | None,
) -> None:
    """Training stall from index refresh: no refresh vs sync vs async, in one invocation."""
    from annsample.bench.stall import bench_stall, stall_table
    from annsample.synthetic import parse_size

    records = bench_stall(parse_size(catalog_size), steps, refresh_every, overrides, out_dir)
    click.echo(stall_table(records), nl=False)
    _write_json(json_path, records)


@bench.command("step")
@click.option(
    "--catalog-size",
    required=True,
    metavar="N",
    help="Synthetic catalog size (e.g. 10k, 1M), with the settings of train --catalog-size N.",
)
@_samplers_option("Samplers to time (repeatable; default: all).")
@click.option(
    "--steps",
    default=None,
    type=click.IntRange(min=1),
    help="Timed steps per sampler (default: 50 from 200k items, else 30; exact GenNi stops "
    "after --max-seconds once it has 3).",
)
@click.option(
    "--warmup-steps",
    default=None,
    type=click.IntRange(min=0),
    help="Uniform-negative training steps before timing, so GenNi is not flat (default 300; "
    "0 with --from-run).",
)
@click.option(
    "--from-run",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Start from the best checkpoint of this train --catalog-size N run folder instead of "
    "a fresh model: TV, hardness and recall of a trained model.",
)
@click.option(
    "--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True
)
@click.option(
    "--max-seconds",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Stop a sampler's timed steps after this long (once it has 3 steps).",
)
@_count_option(
    "--exact-draws",
    default=10_000,
    minimum=100,
    help="Draws per probe query for exact GenNi's empirical TV.",
)
@_file_option(
    "--save-probe",
    "save_probe",
    "Also save the warmed-up item table and probe queries (torch.save) for bench index.",
)
@click.option(
    "--profile", is_flag=True, help="Profile 3 extra ann steps (torch.profiler) into its record."
)
@_count_option(
    "--probe-queries",
    default=32,
    help="Validation users whose hidden states measure TV, hardness, gap and recall.",
)
@_overrides_option("Config override, e.g. --set sampler.index.nprobe=32 (repeatable).")
@_json_option(required=True)
@_user_errors
def bench_step_command(
    catalog_size: str,
    samplers: tuple[str, ...],
    save_probe: Path | None,
    json_path: Path,
    **settings,
) -> None:
    """Full training-step and sampler time of each sampler on the same batches and warmed-up
    model, with TV to exact GenNi, hardness, softmax gap and index recall."""
    from annsample.bench.step import STEP_SAMPLERS, bench_step, step_table
    from annsample.synthetic import parse_size

    _check_writable(json_path, "--json")
    _check_writable(save_probe, "--save-probe")
    records = bench_step(
        parse_size(catalog_size), samplers or STEP_SAMPLERS, save_probe=save_probe, **settings
    )
    click.echo(step_table(records), nl=False)
    _write_json(json_path, records)


_METRIC_CHOICE = click.Choice(["ip", "l2_augmented", "cosine"])


@bench.command("index")
@click.argument("probe", type=click.Path(exists=True, path_type=Path))
@_count_option("--k", "k", default=200)
@click.option("--nlist", "nlists", multiple=True, type=click.IntRange(min=1), help="Repeatable.")
@click.option("--nprobe", "nprobes", multiple=True, type=click.IntRange(min=1), help="Repeatable.")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    type=_METRIC_CHOICE,
    help="Metrics (repeatable; default ip): ivf_flat takes all three, ivf_hnsw, ivf_pq and hnsw "
    "ip and l2_augmented.",
)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(["ivf_flat", "ivf_hnsw", "ivf_pq", "hnsw", "exact"]),
    help="Index kinds (repeatable; default ivf_flat).",
)
@click.option("--ef-search", "ef_searches", multiple=True, type=click.IntRange(min=1))
@click.option(
    "--pq-m", type=click.IntRange(min=1), help="ivf_pq: bytes per item (must divide d; default 16)."
)
@click.option(
    "--refine",
    "refines",
    multiple=True,
    type=click.IntRange(min=1),
    help="ivf_pq: rescore the refine x k best PQ candidates exactly (repeatable; default 2 4).",
)
@click.option(
    "--probe-queries",
    type=click.IntRange(min=1),
    help="With a run folder: validation users whose hidden states are the queries (default 256).",
)
@click.option(
    "--threads", type=click.IntRange(min=1), help="torch and FAISS threads (default: torch's)."
)
@_json_option(help=None)
@_user_errors
def bench_index_command(
    probe: Path,
    k: int,
    nlists: tuple[int, ...],
    nprobes: tuple[int, ...],
    metrics: tuple[str, ...],
    kinds: tuple[str, ...],
    ef_searches: tuple[int, ...],
    pq_m: int | None,
    refines: tuple[int, ...],
    probe_queries: int | None,
    threads: int | None,
    json_path: Path | None,
) -> None:
    """Recall@k against search ms of index configurations, on a trained item table.

    PROBE is either a file saved by bench step --save-probe, or the --out folder of a finished
    annsample train: its best checkpoint's item table, queried by the hidden states of
    --probe-queries validation users.
    """
    import torch

    from annsample.bench.index import index_sweep, load_probe, probe_from_run, sweep_table
    from annsample.index import faiss_ivf

    _check_writable(json_path, "--json")
    if "ivf_pq" not in kinds and (pq_m is not None or refines):
        raise click.UsageError(
            "--pq-m and --refine set ivf_pq only; add --kind ivf_pq or drop them"
        )
    if probe.is_dir():
        xq, xb = probe_from_run(probe, probe_queries or 256)
    elif probe_queries is not None:
        raise click.UsageError(
            "--probe-queries applies to a run folder; a --save-probe file holds its own queries"
        )
    else:
        xq, xb = load_probe(probe)
    if threads is not None:
        torch.set_num_threads(threads)
        faiss_ivf.set_threads(threads)
    records = index_sweep(
        xq,
        xb,
        k,
        nlists=nlists or (1000,),
        nprobes=nprobes or (8, 16, 32, 64),
        metrics=metrics or ("ip",),
        kinds=kinds or ("ivf_flat",),
        ef_searches=ef_searches or (256, 512),
        pq_m=pq_m or 16,
        refines=refines or (2, 4),
    )
    click.echo(sweep_table(records), nl=False)
    _write_json(json_path, records)


def _repeated_option(flag: str, dest: str, default: tuple[int, ...], what: str):
    """A repeatable whole-number option whose default is a list, e.g. ``--n 1000 --n 10000``."""
    shown = " ".join(map(str, default))
    return click.option(
        flag,
        dest,
        multiple=True,
        type=click.IntRange(min=1),
        default=default,
        help=f"{what} (repeatable; default {shown}).",
    )


@bench.command("refresh")
@_repeated_option("--n", "ns", (100_000,), "Catalog size")
@_count_option("--dim", default=64)
@_count_option("--nlist", default=1024)
@_count_option("--repeats", default=3, help="Median of this many runs.")
@_repeated_option("--nprobe", "nprobes", (1, 8, 32, 128), "Lists probed")
@_count_option("--k", "k", default=100)
@_count_option("--queries", default=1000)
@click.option("--metric", type=_METRIC_CHOICE, default="ip", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@_json_option("Write the report here.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@_user_errors
def bench_refresh_command(
    ns: tuple[int, ...],
    dim: int,
    nlist: int,
    repeats: int,
    nprobes: tuple[int, ...],
    k: int,
    queries: int,
    metric: str,
    seed: int,
    json_path: Path | None,
    no_progress: bool,
) -> None:
    """Refresh cost of the item index: build, re_add and retrain times, assignment GFLOP/s and
    recall@k, on a clustered synthetic catalog (FAISS backend)."""
    from annsample.bench.refresh import format_table, machine_line, run_benchmark

    _check_writable(json_path, "--json")
    report = run_benchmark(
        list(ns),
        dim=dim,
        nlist=nlist,
        repeats=repeats,
        nprobes=list(nprobes),
        k=k,
        n_queries=queries,
        metric=metric,
        seed=seed,
        show_progress=not no_progress,
    )
    click.echo(machine_line(report))
    click.echo(format_table(report))
    _write_json(json_path, report)


@bench.command("ivf")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@_repeated_option("--n", "ns", (100_000,), "Catalog size")
@_count_option("--dim", default=64)
@click.option("--nlist", type=click.IntRange(min=1), default=None, help="Default: about sqrt(N).")
@_repeated_option("--nprobe", "nprobes", (8, 16, 32), "Lists probed")
@_count_option("--k", "k", default=100)
@_repeated_option("--queries", "query_counts", (256,), "Queries per search")
@_count_option("--repeats", default=5, help="Median of this many runs.")
@_count_option("--threads", default=1, help="torch (and faiss) threads.")
@click.option("--samplers", is_flag=True, help="Also time the exact GenNi samplers.")
@click.option("--seed", default=0, show_default=True, type=int)
@_json_option("Write the report here (after every catalog size).")
@_user_errors
def bench_ivf_command(json_path: Path | None, **settings) -> None:
    """Search and exact-sampling cost on one device: torch IVF vs FAISS IVF vs exact scoring."""
    from annsample.bench.ivf import bench_ivf, format_table

    _check_writable(json_path, "--json")
    report = bench_ivf(json_path=json_path, **settings)
    click.echo(json.dumps(report["machine"], default=str))
    click.echo(format_table(report["records"]), nl=False)


@bench.command("ddp")
@_config_option("YAML run config (default configs/beauty.yaml).")
@_count_option("--steps", default=100, help="Training steps per run.")
@_count_option("--nproc", default=2, help="Processes of the distributed runs.")
@_count_option("--repeats", default=1, help="Rounds; medians are reported.")
@_overrides_option("Config override for every run (repeatable).")
@click.option(
    "--sparse-probe",
    "sparse_probe_sizes",
    multiple=True,
    type=click.IntRange(min=1),
    metavar="N",
    help="Also probe one DDP backward on an N-row embedding table (repeatable).",
)
@_json_option("Write the report here.")
@_user_errors
def bench_ddp_command(
    config_path: Path | None,
    steps: int,
    nproc: int,
    repeats: int,
    overrides: tuple[str, ...],
    sparse_probe_sizes: tuple[int, ...],
    json_path: Path | None,
) -> None:
    """Distributed-training cost: one process against --nproc (DDP over gloo), dense and sparse
    item gradients, and what DDP does with sparse embedding gradients."""
    from annsample.bench.ddp import bench_ddp

    _check_writable(json_path, "--json")
    report = bench_ddp(
        str(config_path or "configs/beauty.yaml"),
        steps,
        nproc,
        overrides,
        repeats,
        sparse_probe_sizes,
        command=" ".join(["annsample bench ddp", *sys.argv[3:]]),
    )
    click.echo(json.dumps(report, indent=2))
    _write_json(json_path, report)


def _launch(
    nproc: int,
    config_path: Path | None,
    overrides: tuple[str, ...],
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """``annsample train`` again on ``nproc`` ranks, with the run folder fixed here (a default
    ``runs/<date>-<name>`` would differ between ranks started a second apart)."""
    from annsample.distributed import launch, launched_world_size

    if launched_world_size() > 1:
        raise click.UsageError("--nproc is for launching; under torchrun, drop it")
    argv = ["train"]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    for override in overrides:
        argv += ["--set", override]
    argv += ["--resume", str(out)] if resume else ["--out", str(out)]
    if overwrite:
        argv.append("--overwrite")
    launch(nproc, argv, out)


def _format_metrics(stage: str, metrics: dict[str, float]) -> str:
    return f"{stage}: " + "  ".join(f"{key} {value:.4f}" for key, value in metrics.items())


if __name__ == "__main__":
    main()
