"""Ablation grids: one run per combination of config values (and seed), in parallel, resumably.

A grid is a list of ``KEY=V1,V2,...`` strings (e.g. ``sampler.index.refresh_every=1,10,100``);
every combination, times every seed, becomes one run folder under the output folder, named after its
settings, with the resolved config saved beside it like any other run.

``sampler.index.refresh_every`` also takes the schedule words ``never``, ``epoch`` and ``adaptive``,
so a refresh-interval axis can run from every step to never in one grid: ``1,10,epoch,never`` sets
``sampler.index.refresh`` to ``steps`` (with the interval), ``epoch`` or ``never``.

Runs go to up to ``jobs`` worker processes, each with ``train.num_threads = max(1, cores // jobs)``
unless the config fixes it. Running the same command again resumes: finished runs (those with
``results.json``) are skipped, interrupted ones continue from their newest checkpoint. A run that
fails is reported at the end and does not stop the others. The tables and plots are written by
:mod:`annsample.ablation_report`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from tqdm.auto import tqdm

from annsample.config import RunConfig, config_to_dict, load_config
from annsample.errors import ConfigError, RunError

logger = logging.getLogger(__name__)

REFRESH_WORDS = ("never", "epoch", "adaptive")
# settings that may differ between a planned run and its folder without changing what it computes
# (threads change float reduction order, but a resumed run keeps its own: see resume_config)
IGNORED_KEYS = frozenset(
    {
        "train.num_threads",
        "train.show_progress",
        "train.checkpoint_every",
        "train.keep_checkpoints",
    }
)
PLAN_FILE = "ablation.json"  # written into the output folder: what was asked, for the record
LOG_FOLDER = "logs"  # one log file per run: <out>/logs/<label>.log
WALL_FILE = "ablation-run.json"  # written into each finished run folder: its wall time

# (config, run folder, resume, overwrite) -> None; raises on failure
Runner = Callable[[RunConfig, Path, bool, bool], None]


@dataclass(frozen=True)
class PlannedRun:
    """One run of the grid: its folder name, the grid's settings for it, and its resolved config."""

    label: str
    settings: tuple[str, ...]  # KEY=VALUE overrides from the grid and the seed
    config: RunConfig


@dataclass(frozen=True)
class RunOutcome:
    """What happened to one planned run in this invocation."""

    label: str
    run_dir: Path
    state: str  # "finished", "resumed", "skipped" (finished before), "failed"
    seconds: float = 0.0
    error: str = ""


def parse_grid(grid: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """``("a.b=1,2", "c=x")`` -> [("a.b", ["1", "2"]), ("c", ["x"])].

    >>> parse_grid(("sampler.index.refresh_every=1,10", "seed=0"))
    [('sampler.index.refresh_every', ['1', '10']), ('seed', ['0'])]
    """
    axes = []
    for text in grid:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.replace(",", "").strip():
            raise ConfigError(
                f"--grid {text!r}: expected KEY=V1,V2,..., e.g. sampler.index.refresh_every=1,10,100"
            )
        axes.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    keys = [key for key, _ in axes]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ConfigError(
            f"--grid names {', '.join(repeated)} more than once; give all its values in one "
            "--grid KEY=V1,V2,..."
        )
    if "sampler.index.refresh_every" in keys and "sampler.index.refresh" in keys:
        raise ConfigError(
            "--grid varies both sampler.index.refresh and sampler.index.refresh_every; use one "
            "axis, e.g. --grid sampler.index.refresh_every=1,10,100,epoch,never"
        )
    return axes


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2].

    >>> parse_seeds("0, 1,2")
    [0, 1, 2]
    """
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r}: expected whole numbers separated by commas, e.g. --seeds 0,1,2"
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give distinct seeds, e.g. --seeds 0,1,2")
    return seeds


def axis_settings(key: str, value: str) -> tuple[str, ...]:
    """The config overrides for one grid value (``refresh_every`` takes schedule words too).

    >>> axis_settings("sampler.index.refresh_every", "never")
    ('sampler.index.refresh=never',)
    >>> axis_settings("sampler.index.refresh_every", "10")
    ('sampler.index.refresh=steps', 'sampler.index.refresh_every=10')
    """
    if key != "sampler.index.refresh_every":
        return (f"{key}={value}",)
    if value in REFRESH_WORDS:
        return (f"sampler.index.refresh={value}",)
    return ("sampler.index.refresh=steps", f"{key}={value}")


def default_threads(jobs: int) -> int:
    """Torch threads per job, so that ``jobs`` jobs share this machine's cores without
    oversubscribing them."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // jobs)


def plan_runs(
    config_path: str | Path | None,
    grid: tuple[str, ...],
    seeds: list[int] | None = None,
    overrides: tuple[str, ...] = (),
    threads: int = 1,
    preset: tuple[str, ...] = (),
) -> list[PlannedRun]:
    """Every combination of the grid (times every seed), each config validated before any run.

    A combination in which the run's own schedule or sampler ignores one of its grid values (e.g.
    ``sampler.index.asynchronous=true`` with ``refresh_every=never``) would only repeat another run,
    so it is left out with a warning; any other invalid combination is an error.

    Args:
        config_path: base YAML config (None = defaults).
        grid: ``KEY=V1,V2,...`` axes; ``seed`` is not an axis (pass ``seeds``).
        seeds: one run per seed per combination (None = the config's own seed, not in the label).
        overrides: ``KEY=VALUE`` for every run.
        threads: ``train.num_threads`` for runs whose config leaves it at 0 (torch's default).
        preset: settings applied before the config file's own (e.g.
            :func:`annsample.config.catalog_overrides` for ``--catalog-size``).
    """
    axes = parse_grid(grid)
    if any(key == "seed" for key, _ in axes):
        raise ConfigError("vary the seed with --seeds 0,1,2, not --grid seed=...")
    base = load_config(config_path, overrides, preset=preset)
    short = [key.split(".")[-1] for key, _ in axes]
    # the last part of a key names it in folder names, unless two axes share it
    names = [s if short.count(s) == 1 else key for s, (key, _) in zip(short, axes, strict=True)]
    plans = []
    left_out: list[str] = []
    for values in itertools.product(*(vals for _, vals in axes)):
        settings: tuple[str, ...] = ()
        for (key, _), value in zip(axes, values, strict=True):
            settings += axis_settings(key, value)
        label = "_".join(f"{name}={value}" for name, value in zip(names, values, strict=True))
        label = re.sub(r"[^\w.=+-]", "_", label) or "default"
        for seed in seeds if seeds is not None else [None]:
            seeded = settings + ((f"seed={seed}",) if seed is not None else ())
            run_label = label if seed is None else f"{label}_seed={seed}"
            extra = (f"name={base.name}-{label}", "train.show_progress=false")
            try:
                config = load_config(config_path, overrides + seeded + extra, preset=preset)
            except ConfigError:
                # a combination whose schedule ignores one of its grid values (e.g. asynchronous
                # with refresh=never) would repeat another run; other errors still stop the plan
                load_config(
                    config_path, overrides + seeded + extra, check_ignored=False, preset=preset
                )
                if seed is None or seed == seeds[0]:
                    left_out.append(label)
                continue
            if not config.train.num_threads:
                config = _with_threads(config, threads)
            plans.append(PlannedRun(run_label, seeded, config))
    if left_out:
        if not plans:
            load_config(config_path, overrides + settings + extra, preset=preset)  # raises: say why
        logger.warning(
            "left out %d grid combination(s) whose refresh schedule or sampler ignores one of "
            "their values (they would repeat another run): %s",
            len(left_out),
            ", ".join(left_out),
        )
    labels = [plan.label for plan in plans]
    clashes = sorted({label for label in labels if labels.count(label) > 1})
    if clashes:
        raise ConfigError(
            f"--grid values give the same run folder name {clashes[0]!r} more than once; "
            "use values that differ in letters, digits or . = + -"
        )
    return plans


def _with_threads(config: RunConfig, threads: int) -> RunConfig:
    return dataclasses.replace(config, train=dataclasses.replace(config.train, num_threads=threads))


def train_runner(config: RunConfig, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """The default runner: :func:`annsample.train.train` in the calling process."""
    from annsample.train import train

    train(config, run_dir, overwrite=overwrite, resume=resume)


def _saved_config(run_dir: Path) -> dict | None:
    from annsample.checkpoint import flatten

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    # a run folder's config.yaml lists every key (a preset's included): no ignored-setting check
    return flatten(config_to_dict(load_config(path, check_ignored=False)))


def _check_folder_matches(plan: PlannedRun, run_dir: Path) -> None:
    """Refuse to skip or resume a run folder written with other settings than the plan's."""
    from annsample.checkpoint import flatten

    saved = _saved_config(run_dir)
    if saved is None:
        return
    planned = flatten(config_to_dict(plan.config))
    differ = [
        key
        for key in sorted(saved.keys() | planned.keys())
        if key not in IGNORED_KEYS and saved.get(key) != planned.get(key)
    ]
    if differ:
        key = differ[0]
        raise ConfigError(
            f"run folder {run_dir} was written with {key}={saved.get(key)!r} but the grid now asks "
            f"for {key}={planned.get(key)!r}; use another --out, or pass --overwrite to run the "
            "grid again from scratch"
        )


def resume_config(plan: PlannedRun, run_dir: Path) -> RunConfig:
    """The plan's config with the thread count the interrupted run started with (a resumed run
    must keep its config)."""
    saved = load_config(run_dir / "config.yaml", check_ignored=False)
    return _with_threads(plan.config, saved.train.num_threads)


def _execute(
    runner: Runner,
    config: RunConfig,
    run_dir: Path,
    resume: bool,
    overwrite: bool,
    log_path: Path,
) -> tuple[float, str]:
    """Run one job with its log records in ``log_path``; returns (seconds, error or "")."""
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    start = time.perf_counter()
    error = ""
    try:
        runner(config, run_dir, resume, overwrite)
    except Exception as exc:  # one failed run must not stop the others
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        logging.getLogger(__name__).error("run failed:\n%s", traceback.format_exc())
    finally:
        seconds = time.perf_counter() - start
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
    if not error:
        record = {"wall_seconds": seconds, "resumed": resume}
        (run_dir / WALL_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return seconds, error


def _child(runner, config, run_dir, resume, overwrite, log_path, connection) -> None:
    """Worker process body: run one job and send (seconds, error) back."""
    logging.getLogger("faiss").setLevel(logging.WARNING)
    # faiss's (and torch's) OpenMP pool would otherwise take every core in every job; OpenMP reads
    # this when faiss loads, which in a fresh worker is after this line
    threads = str(max(1, config.train.num_threads))
    os.environ["OMP_NUM_THREADS"] = threads
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(int(threads))
    connection.send(_execute(runner, config, run_dir, resume, overwrite, log_path))
    connection.close()


def run_ablation(
    config_path: str | Path | None,
    grid: tuple[str, ...],
    out_dir: str | Path,
    seeds: list[int] | None = None,
    overrides: tuple[str, ...] = (),
    jobs: int = 1,
    overwrite: bool = False,
    runner: Runner | None = None,
    show_progress: bool = True,
    preset: tuple[str, ...] = (),
) -> list[RunOutcome]:
    """Run (or resume) every run of the grid; returns one outcome per planned run, in grid order.

    With ``jobs`` = 1 the runs train one after another in this process; with more, each run is
    its own spawned process, at most ``jobs`` at once (a run that crashes its process fails alone).
    ``runner`` (default :func:`train_runner`) must be a module-level function when ``jobs`` > 1
    (it is sent to the workers). Nothing is trained until every config is valid and every
    existing run folder matches the grid. ``preset``: see :func:`plan_runs`.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    runner = train_runner if runner is None else runner
    plans = plan_runs(
        config_path, grid, seeds, overrides, threads=default_threads(jobs), preset=preset
    )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} exists and is not a folder; choose another --out")
    from annsample.checkpoint import list_checkpoints

    todo: list[tuple[PlannedRun, RunConfig, bool, bool]] = []  # plan, config, resume, overwrite
    outcomes: dict[str, RunOutcome] = {}
    for plan in plans:
        run_dir = out / plan.label
        if overwrite or not run_dir.exists():
            todo.append((plan, plan.config, False, overwrite))
            continue
        _check_folder_matches(plan, run_dir)
        if (run_dir / "results.json").is_file():
            outcomes[plan.label] = RunOutcome(plan.label, run_dir, "skipped")
        elif list_checkpoints(run_dir):
            todo.append((plan, resume_config(plan, run_dir), True, False))
        else:  # interrupted before its first checkpoint: nothing to keep
            logger.warning("%s has no checkpoint to resume from; starting it again", run_dir)
            todo.append((plan, plan.config, False, True))
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_FOLDER).mkdir(exist_ok=True)
    record = {
        "config": None if config_path is None else str(config_path),
        "grid": list(grid),
        "seeds": seeds,
        "overrides": list(overrides),
        "preset": list(preset),
        "jobs": jobs,
        "runs": [plan.label for plan in plans],
    }
    (out / PLAN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if outcomes:
        logger.info("%d of %d runs already finished; skipping them", len(outcomes), len(plans))
    bar = tqdm(total=len(todo), desc="ablation runs", disable=not show_progress)
    try:
        for label, outcome in _run_all(todo, out, jobs, runner):
            outcomes[label] = outcome
            bar.update(1)
            if outcome.state == "failed":
                logger.error("run %s failed: %s", label, outcome.error)
            else:
                logger.info("run %s %s in %.1f s", label, outcome.state, outcome.seconds)
    except KeyboardInterrupt:
        logger.warning(
            "ablation interrupted; run the same command again to resume it (finished runs are "
            "kept, interrupted ones continue from their checkpoints)"
        )
        raise
    finally:
        bar.close()
    return [outcomes[plan.label] for plan in plans]


def _run_all(todo, out: Path, jobs: int, runner: Runner):
    """Yield (label, outcome) as runs end."""

    def outcome(plan, resume, seconds, error) -> RunOutcome:
        state = "failed" if error else ("resumed" if resume else "finished")
        log_path = out / LOG_FOLDER / f"{plan.label}.log"
        if error:
            error = f"{error} (log: {log_path})"
        return RunOutcome(plan.label, out / plan.label, state, seconds, error)

    if jobs == 1:
        for plan, config, resume, overwrite in todo:
            log_path = out / LOG_FOLDER / f"{plan.label}.log"
            seconds, error = _execute(runner, config, out / plan.label, resume, overwrite, log_path)
            yield plan.label, outcome(plan, resume, seconds, error)
        return

    context = multiprocessing.get_context("spawn")  # fork after torch/faiss threads is unsafe
    pending = list(todo)
    running: dict[int, tuple] = {}  # sentinel -> (process, connection, plan, resume, start)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                plan, config, resume, overwrite = pending.pop(0)
                receive, send = context.Pipe(duplex=False)
                log_path = out / LOG_FOLDER / f"{plan.label}.log"
                process = context.Process(
                    target=_child,
                    args=(runner, config, out / plan.label, resume, overwrite, log_path, send),
                    name=f"ablation-{plan.label}",
                )
                process.start()
                send.close()  # the child holds the only writing end: EOF means it died
                running[process.sentinel] = (process, receive, plan, resume, time.perf_counter())
            for sentinel in wait(list(running)):
                process, receive, plan, resume, start = running.pop(sentinel)
                try:
                    seconds, error = receive.recv() if receive.poll() else (None, None)
                except EOFError:
                    seconds, error = None, None
                process.join()
                receive.close()
                if error is None:
                    seconds = time.perf_counter() - start
                    error = f"the run's process died (exit code {process.exitcode})"
                yield plan.label, outcome(plan, resume, seconds, error)
    finally:
        for process, receive, *_ in running.values():
            process.join(timeout=10)  # they got the same Ctrl-C; give them a moment to exit
            if process.is_alive():
                process.terminate()
                process.join()
            receive.close()


def failures_text(outcomes: list[RunOutcome]) -> str:
    """One line per failed run (empty when none failed)."""
    return "".join(f"FAILED {o.label}: {o.error}\n" for o in outcomes if o.state == "failed")


def outcomes_table(outcomes: list[RunOutcome]) -> str:
    """A markdown table of what this invocation did with each run."""
    lines = ["| run | state | seconds |", "|---|---|---|"]
    for o in outcomes:
        seconds = f"{o.seconds:.1f}" if o.state != "skipped" else "-"
        lines.append(f"| {o.label} | {o.state} | {seconds} |")
    return "\n".join(lines) + "\n"
