"""Training: SASRec with a chosen negative sampler and loss, early stopping on validation NDCG@10.

``train(config, out_dir)`` is a short loop over :func:`setup` / :func:`train_epoch` /
:func:`validate` / :func:`finish`, as nanoGPT and RecBole keep theirs. The pieces live beside what
they build: data in :mod:`annsample.prepare`, the sampler in :mod:`annsample.samplers`, the index
refresher and schedule in :mod:`annsample.refresh`, the staleness monitor in
:mod:`annsample.staleness`, run folders and ``metrics.jsonl`` in :mod:`annsample.run`, checkpoints
in :mod:`annsample.checkpoint`, NaN and budget stops in :mod:`annsample.guards`. Each step samples
and scores through the public API (:mod:`annsample.api`), the seam any torch model uses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from annsample import checkpoint as checkpoint_mod
from annsample import distributed, guards
from annsample import staleness as staleness_mod
from annsample.api import sample_negatives, sampled_logits, sampled_loss
from annsample.checkpoint import Progress
from annsample.config import RunConfig, TrainConfig, config_to_dict, dump_config
from annsample.errors import ConfigError, NumericalError
from annsample.evaluate import evaluate_model, oracle_results
from annsample.index import faiss_ivf
from annsample.losses import full_ce_loss
from annsample.model import SASRec, count_parameters
from annsample.prepare import Prepared, check_sampler_fits, prepare_data, probe_set
from annsample.refresh import make_index_refresher, make_refresh_schedule
from annsample.run import MetricsLog, check_run_dir, prepare_run_dir, resume_point
from annsample.samplers import (
    BlendSampler,
    Sampler,
    UniformSampler,
    build_sampler,
    make_sampler,
)
from annsample.staleness import StalenessMonitor

logger = logging.getLogger(__name__)


@dataclass
class Training:
    """Everything the loop carries between setup, epochs, validation and finish."""

    config: RunConfig
    out: Path
    ctx: distributed.DistContext
    device: torch.device
    prepared: Prepared
    model: SASRec
    optimizers: list[torch.optim.Optimizer]
    generators: dict[str, torch.Generator]  # "sampler", "order"
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]  # one per optimiser, or none
    sampler: Sampler | None  # None for full_ce
    warmup: Sampler = field(default_factory=UniformSampler)  # serves the first warmup_steps
    refresher: Any = None  # the ann sampler's IndexRefresher (AgreedRefresher under DDP)
    schedule: Any = None
    monitor: StalenessMonitor | None = None
    log: MetricsLog | None = None
    progress: Progress = field(default_factory=Progress)
    last_checkpoint: Path | None = None
    catalog: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        if self.refresher is not None:
            self.refresher.close()


def train(
    config: RunConfig, out_dir: str | Path, overwrite: bool = False, resume: bool = False
) -> dict[str, Any]:
    """Train, early-stop on validation NDCG@10, test the best checkpoint once; returns results.

    Writes into ``out_dir``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``best.pt``,
    ``results.json``, and while training runs full-state checkpoints in ``checkpoints/`` every
    ``train.checkpoint_every`` steps and at every epoch end (the newest ``train.keep_checkpoints``
    are kept; the folder is removed once the run finishes). Nothing is created or replaced until
    the data, model and index are set up, so bad input leaves the file system as it was.

    NaN or inf in the hidden states, the loss or the gradients stops training before the update
    with a :class:`NumericalError` naming the step and the last good checkpoint.

    With ``resume``, ``out_dir`` is an interrupted run folder: training continues from its newest
    readable checkpoint, which must match ``config`` and the dataset, and on CPU ends with the same
    weights, metrics records and results as the uninterrupted run.
    """
    run = setup(config, Path(out_dir), overwrite, resume)
    try:
        budget = guards.Budget(
            config.train.max_seconds,
            sum(run.progress.epoch_seconds) + run.progress.epoch_elapsed,
            agree=functools.partial(distributed.any_rank, run.ctx),
        )
        for epoch in range(run.progress.next_epoch, config.train.epochs + 1):
            if run.progress.stopped:
                break
            mean_loss, seconds = train_epoch(run, epoch, budget)
            validate(run, epoch, mean_loss, seconds, budget)
            end_epoch(run, epoch, budget)
    except NumericalError as error:
        kept = (
            f"the last good checkpoint is {run.last_checkpoint}"
            if run.last_checkpoint is not None
            else "no checkpoint was written before it"
        )
        raise NumericalError(
            f"{error}; {kept}. The run is deterministic, so resuming repeats this: lower "
            "train.lr (or check the data) and start a new run"
        ) from None
    finally:
        run.close()
    return finish(run)


def setup(config: RunConfig, out: Path, overwrite: bool, resume: bool) -> Training:
    """Data, model, optimisers, sampler and index (restored from a checkpoint when resuming), then
    the run folder and its metrics log."""
    tc = config.train
    ctx = distributed.init(distributed.resolve_device(tc.device))  # no-op unless under torchrun
    checkpoint: dict[str, Any] | None = None
    if resume:
        checkpoint_path, checkpoint, corrupt = resume_point(out)
        changed = checkpoint_mod.check_config(
            checkpoint, config_to_dict(config), checkpoint_path, config_to_dict(RunConfig())
        )
    elif ctx.is_main:
        check_run_dir(out, overwrite)
    if tc.num_threads:
        # FAISS's OpenMP pool follows too: on a shared machine an idle-spinning pool of every
        # core's threads costs more than it searches.
        torch.set_num_threads(tc.num_threads)
        faiss_ivf.set_threads(tc.num_threads)
    device = distributed.device_for(ctx, distributed.resolve_device(tc.device))
    seed_everything(config.seed)
    prepared = prepare_data(config)
    split = prepared.split
    check_sampler_fits(config, prepared)
    catalog = checkpoint_mod.catalog_summary(split)
    if checkpoint is not None:
        checkpoint_mod.check_catalog(checkpoint, catalog, checkpoint_path, config.data.path)
    logger.info(
        "data: %d users (%d dropped), %d items, %d training sequences",
        split.n_users,
        split.n_dropped,
        split.n_items,
        len(prepared.train_users),
    )
    model = SASRec(split.n_items, config.data.max_len, config.model).to(device)
    logger.info("model: SASRec with %d parameters", count_parameters(model))
    generators = {
        "sampler": torch.Generator(device=device).manual_seed(config.seed + 1),
        "order": torch.Generator().manual_seed(config.seed + 2),
    }
    distributed.decorrelate(ctx, config.seed, 0, [generators["sampler"]])
    optimizers = make_optimizers(model, config)
    total_steps = config.train.epochs * steps_per_epoch(len(prepared.train_users), config.train)
    run = Training(
        config, out, ctx, device, prepared, model, optimizers, generators,
        make_schedulers(optimizers, config.train, total_steps), sampler=None, catalog=catalog,
    )  # fmt: skip
    try:
        _setup_sampler(run, built=checkpoint is None)
        if checkpoint is not None:
            _restore(run, checkpoint)
            run.last_checkpoint = checkpoint_path
        # Everything above only reads; the run folder is created or changed from here on.
        if not ctx.is_main:  # rank 0 owns the run folder; the others log beside it
            distributed.barrier(ctx)
            run.log = MetricsLog(distributed.rank_log_path(out, ctx))
        elif checkpoint is None:
            run.out = prepare_run_dir(out, overwrite)
            dump_config(config, run.out / "config.yaml")
            run.log = MetricsLog(run.out / "metrics.jsonl")
        else:
            run.log = MetricsLog(out / "metrics.jsonl", resume_at=checkpoint["metrics_offset"])
            checkpoint_mod.set_aside(out, corrupt)
            if changed:
                logger.info("resuming with changed %s", ", ".join(changed))
                dump_config(config, out / "config.yaml")
            logger.info(
                "resuming %s from %s (step %d)", out, checkpoint_path.name, run.progress.step
            )
        if ctx.is_main:
            distributed.barrier(ctx)  # the folder is ready for the other ranks' logs
    except BaseException:
        run.close()
        raise
    return run


def _setup_sampler(run: Training, built: bool) -> None:
    """The sampler the config names; for ``ann`` its index (built from the initial item table
    unless a checkpoint will restore it), refresh schedule and staleness monitor."""
    config, prepared = run.config, run.prepared
    if config.loss.name == "full_ce":
        return
    if config.sampler.name == "ann":
        run.refresher = make_index_refresher(config, config.model.hidden_size, prepared.n_items)
        run.schedule = make_refresh_schedule(config)
        if run.ctx.enabled:
            run.refresher = distributed.AgreedRefresher(run.refresher, run.ctx)
        if built:
            item_ids = torch.arange(1, prepared.n_items + 1, device=run.device)
            snapshot = staleness_mod.item_table_snapshot(run.model)
            run.refresher.build(snapshot, step=0, ids=item_ids)
    run.sampler = build_sampler(config.sampler, prepared.popularity, run.refresher)
    sc = config.sampler
    if sc.warmup_steps or sc.warmup_blend_steps or sc.warmup_share:
        run.warmup = make_sampler(sc.warmup_sampler, popularity=prepared.popularity, beta=sc.beta)
    if run.refresher is not None:
        ic = config.sampler.index
        probe_inputs, exclusions = probe_set(prepared, config, run.device)
        run.monitor = StalenessMonitor(
            run.model,
            run.sampler,
            probe_inputs,
            exclusions,
            probe_every=ic.probe_every,
            # the table the current index was built from (for drift); kept when it is measured
            keep_built=(
                ic.refresh == "adaptive" or ic.probe_every > 0 or prepared.n_items <= 2_000_000
            ),
        )


def _restore(run: Training, checkpoint: dict[str, Any]) -> None:
    """Weights, optimisers, RNGs, progress and the index from a checkpoint."""
    run.progress = checkpoint_mod.restore_training(
        checkpoint, run.model, run.optimizers, run.generators, run.schedulers
    )
    distributed.decorrelate(
        run.ctx, run.config.seed, run.progress.step, [run.generators["sampler"]]
    )
    if run.refresher is not None:
        checkpoint_mod.restore_refresher(
            run.refresher, run.schedule, checkpoint["index"], run.device
        )
        if run.monitor is not None and run.monitor.keep_built:
            built = checkpoint["index"]["built"]
            run.monitor.built = None if built is None else built.to(run.device)


def train_epoch(run: Training, epoch: int, budget: guards.Budget) -> tuple[float, float]:
    """One epoch of updates (or its rest, when resuming mid-epoch); returns (mean loss, seconds)."""
    config, tc, progress, prepared = run.config, run.config.train, run.progress, run.prepared
    run.model.train()
    t0 = time.perf_counter()
    inputs = torch.as_tensor(prepared.train_inputs)
    targets = torch.as_tensor(prepared.train_targets)
    lengths = (inputs > 0).sum(dim=1).clamp(min=1)  # (U',) real input positions per sequence
    order = run.generators["order"]
    order_state = order.get_state()  # redraws this epoch's batches on resume
    batches = make_batches(lengths, tc.batch_size, tc.bucket_by_length, order)
    if tc.max_steps_per_epoch:
        batches = batches[: tc.max_steps_per_epoch]
    batches = distributed.shard_batches(run.ctx, batches)
    done, total_loss, elapsed = progress.next_batch, progress.epoch_loss_sum, progress.epoch_elapsed
    step = progress.step
    loss_fn = distributed.step_function(run.ctx, run.model, step_loss)  # DDP-wrapped under torchrun
    bar = tqdm(
        batches[done:],
        desc=f"epoch {epoch}",
        leave=False,
        initial=done,
        total=len(batches),
        disable=not tc.show_progress or not run.ctx.is_main,
    )
    for position, batch in enumerate(bar, start=done + 1):
        width = int(lengths[batch].max())  # trim the all-padding left columns
        seq = inputs[batch, -width:].to(run.device)
        tgt = targets[batch, -width:].to(run.device)
        sampler = step_sampler(run, step)
        exclude = config.sampler.exclude_history and run.sampler is not None
        histories = prepared.histories(batch, run.device) if exclude else None
        loss = loss_fn(
            seq, tgt, config, sampler, histories, prepared.n_items, step,
            run.generators["sampler"],
        )  # fmt: skip
        loss_value = loss.item()
        guards.check_loss(loss_value, step + 1)
        for opt in run.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        guards.check_gradients(run.model, step + 1)
        for opt in run.optimizers:
            opt.step()
        for scheduler in run.schedulers:
            scheduler.step()
        step += 1
        total_loss += loss_value
        if run.monitor is not None:
            run.monitor.after_step(run.refresher, run.schedule, step, epoch_end=False, log=run.log)
        if step % tc.log_every == 0:
            run.log.write(step, **{"train/loss": loss_value, "train/epoch": epoch})
            bar.set_postfix(_postfix(loss_value, run.monitor), refresh=False)
        if budget.spent():
            batches = batches[:position]  # the epoch ends here; so does training
            break
        # the epoch-end checkpoint covers the last batch
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and position < len(batches):
            progress.step, progress.next_epoch, progress.next_batch = step, epoch, position
            progress.epoch_loss_sum = total_loss
            progress.epoch_elapsed = elapsed + time.perf_counter() - t0
            save_checkpoint(run, order_state)
    progress.step = step
    if run.monitor is not None:
        run.monitor.after_step(run.refresher, run.schedule, step, epoch_end=True, log=run.log)
    seconds = elapsed + time.perf_counter() - t0
    progress.epoch_seconds.append(seconds)
    mean_loss = total_loss / max(len(batches), 1)
    run.log.write(
        step,
        **{"train/epoch_loss": mean_loss, "train/epoch": epoch, "train/epoch_seconds": seconds},
    )
    return mean_loss, seconds


def validate(
    run: Training, epoch: int, mean_loss: float, seconds: float, budget: guards.Budget
) -> None:
    """Validation NDCG@10 every ``train.eval_every`` epochs (and at the last); keeps best.pt and
    counts toward early stopping."""
    tc, progress = run.config.train, run.progress
    if epoch % tc.eval_every and epoch != tc.epochs and not budget.spent():
        logger.info("epoch %d: loss %.4f (%.1f s)", epoch, mean_loss, seconds)
        return
    valid = distributed.broadcast(
        run.ctx,
        evaluate_model(
            run.model, run.prepared, "valid", run.config, run.device, tc.valid_users or None
        )
        if run.ctx.is_main
        else None,
    )
    run.log.write(
        progress.step,
        **{f"eval/valid/{key}": value for key, value in valid.items()},
        **{"train/epoch": epoch},
    )
    logger.info(
        "epoch %d: loss %.4f, valid ndcg@10 %.4f hr@10 %.4f (%.1f s)",
        epoch,
        mean_loss,
        valid["ndcg@10"],
        valid["hr@10"],
        seconds,
    )
    if valid["ndcg@10"] > progress.best_ndcg:
        progress.best_ndcg, progress.best_epoch = valid["ndcg@10"], epoch
        progress.bad_evals = 0
        if run.ctx.is_main:
            progress.best_digest = checkpoint_mod.save_best(run.model, run.out / "best.pt")
    else:
        progress.bad_evals += 1
        if progress.bad_evals >= tc.patience:
            logger.info("early stop at epoch %d (best epoch %d)", epoch, progress.best_epoch)
            progress.stopped = True


def end_epoch(run: Training, epoch: int, budget: guards.Budget) -> None:
    """Stop when the budget is spent, and checkpoint the epoch's end."""
    progress = run.progress
    if budget.spent():
        logger.info(
            "train.max_seconds=%g spent at step %d", run.config.train.max_seconds, progress.step
        )
        progress.stopped = True
    progress.next_epoch, progress.next_batch = epoch + 1, 0
    progress.epoch_loss_sum = progress.epoch_elapsed = 0.0
    save_checkpoint(run, run.generators["order"].get_state())


def step_sampler(run: Training, step: int) -> Sampler | None:
    """The sampler of optimiser step ``step`` (0-based): the warm-up sampler for the first
    ``sampler.warmup_steps`` steps, then for ``sampler.warmup_blend_steps`` steps a
    :class:`~annsample.samplers.BlendSampler` whose warm-up share falls linearly from 1 towards
    ``sampler.warmup_share`` = s (from s + (1-s)·B/(B+1) to s + (1-s)/(B+1)), then the run's
    sampler, blended with the warm-up sampler at share s when s > 0."""
    sc = run.config.sampler
    after = step - sc.warmup_steps
    if after < 0:
        return run.warmup
    floor = sc.warmup_share
    if after < sc.warmup_blend_steps:
        share = floor + (1.0 - floor) * (1.0 - (after + 1) / (sc.warmup_blend_steps + 1))
        return BlendSampler(run.warmup, run.sampler, share)
    if floor:
        return BlendSampler(run.warmup, run.sampler, floor)
    return run.sampler


def save_checkpoint(run: Training, order_state: torch.Tensor) -> None:
    """A full-state checkpoint (rank 0 only); ``order_state`` redraws the current epoch's batches."""
    if not run.ctx.is_main:
        return
    guards.check_parameters(run.model, run.progress.step)
    index = None
    if run.refresher is not None:
        index = checkpoint_mod.refresher_state(run.refresher, run.schedule)
        index["built"] = run.monitor.built
    state = {
        "step": run.progress.step,
        "config": config_to_dict(run.config),
        "catalog": run.catalog,
        "progress": dataclasses.asdict(run.progress),
        "model": run.model.state_dict(),
        "optimizers": [opt.state_dict() for opt in run.optimizers],
        "schedulers": [scheduler.state_dict() for scheduler in run.schedulers],
        "rng": checkpoint_mod.capture_rng(
            {"sampler": run.generators["sampler"].get_state(), "order": order_state}
        ),
        "index": index,
        "metrics_offset": run.log.sync(),
    }
    keep = run.config.train.keep_checkpoints
    run.last_checkpoint = checkpoint_mod.save_checkpoint(run.out, state, keep)


def finish(run: Training) -> dict[str, Any]:
    """Test the best weights once, write results.json, drop the checkpoints; returns results."""
    ctx, config, progress, out = run.ctx, run.config, run.progress, run.out
    if not ctx.is_main:  # rank 0 tests the best weights; the others take its results
        run.log.close()
        results = distributed.broadcast(ctx, None)
        distributed.close(ctx)
        return results
    run.model.load_state_dict(
        checkpoint_mod.load_best(out / "best.pt", progress.best_digest, run.device)
    )
    valid = evaluate_model(run.model, run.prepared, "valid", config, run.device)
    test = evaluate_model(run.model, run.prepared, "test", config, run.device)
    run.log.write(progress.step, **{f"eval/test/{key}": value for key, value in test.items()})
    run.log.close()
    epoch_seconds = progress.epoch_seconds
    results = {
        "name": config.name,
        "best_epoch": progress.best_epoch,
        "epochs_run": len(epoch_seconds),
        "steps": progress.step,
        "seconds_per_epoch": float(np.median(epoch_seconds)) if epoch_seconds else 0.0,
        "valid": valid,
        "test": test,
    }
    if run.prepared.catalog is not None:
        results.update(oracle_results(run.prepared, config, test))
    checkpoint_mod.atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    # Checkpoints exist to resume an interrupted run; a finished run's outputs are best.pt and
    # results.json (and at a million items three checkpoints hold gigabytes).
    shutil.rmtree(checkpoint_mod.checkpoint_folder(out), ignore_errors=True)
    logger.info("test: %s", ", ".join(f"{key} {value:.4f}" for key, value in test.items()))
    distributed.broadcast(ctx, results)
    distributed.close(ctx)
    return results


def step_loss(
    model: SASRec,
    seq: torch.Tensor,
    tgt: torch.Tensor,
    config: RunConfig,
    sampler: Sampler | None,
    histories: torch.Tensor | None,
    n_items: int,
    step: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One batch's loss, sampled and scored through the public API (:mod:`annsample.api`).

    Args:
        seq, tgt: (B, T) int64 inputs and next items (0 = padding).
        sampler: the sampler of this step (None for ``full_ce``).
        histories: (B, H) int64 items to exclude per sequence (0 = padding), or None.
        n_items: catalog size N (gBCE's calibration).
        step: steps done (for error messages).
        generator: the sampler's random generator.
    """
    h = model.encode(seq)  # (B, T, d)
    mask = tgt > 0
    h_pos = h[mask]  # (P, d) real positions only
    guards.check_hidden(h_pos, step + 1)
    positives = tgt[mask]  # (P,)
    item_embeddings = model.item_embeddings
    if config.loss.name == "full_ce":
        return full_ce_loss(h_pos, item_embeddings, positives)
    k = config.sampler.num_negatives
    negatives = sample_negatives(sampler, h, tgt, item_embeddings, k, generator, histories)
    pos_logits, neg_logits = sampled_logits(
        h_pos, model.item_vectors(positives), model.item_vectors(negatives.ids)
    )  # (P,), (P, k)
    log_q = negatives.log_q if config.loss.logq_correction else None
    return sampled_loss(
        config.loss.name,
        pos_logits,
        neg_logits,
        log_q,
        n_items=n_items,
        gbce_t=config.loss.gbce_t,
        sce_scale=config.loss.sce_scale,
        corrected_logq=config.loss.corrected_logq,
    )


def make_optimizers(model: SASRec, config: RunConfig) -> list[torch.optim.Optimizer]:
    """Adam; with ``model.sparse_embeddings`` SparseAdam for the item table and Adam for the rest.

    The item table learns at ``train.embedding_lr`` (``train.lr`` when 0), everything else at
    ``train.lr``; weight decay applies to the dense parameters (SparseAdam has none).
    """
    lr, wd = config.train.lr, config.train.weight_decay
    embedding_lr = config.train.embedding_lr or lr
    table = model.item_embedding.weight
    rest = [p for n, p in model.named_parameters() if not n.startswith("item_embedding.")]
    if config.model.sparse_embeddings:
        return [
            torch.optim.SparseAdam([table], lr=embedding_lr),
            torch.optim.Adam(rest, lr=lr, weight_decay=wd),
        ]
    if embedding_lr == lr:  # one group, as every checkpoint written before embedding_lr has
        return [torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)]
    groups = [{"params": [table], "lr": embedding_lr}, {"params": rest}]
    return [torch.optim.Adam(groups, lr=lr, weight_decay=wd)]


def steps_per_epoch(n_rows: int, tc: TrainConfig) -> int:
    """Optimiser steps in one epoch over ``n_rows`` training sequences: ceil(n_rows / batch_size)
    (what :func:`make_batches` gives, bucketed or not), capped by ``max_steps_per_epoch``.

    Under torchrun an epoch drops its batch with fewer rows than ranks, if any (one at most), so
    it can run one step fewer than this.
    """
    steps = -(-n_rows // tc.batch_size)
    return min(steps, tc.max_steps_per_epoch) if tc.max_steps_per_epoch else steps


def lr_factor(step: int, tc: TrainConfig, total_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) as a fraction of ``train.lr``.

    Linear warm-up over the first W = ``lr_warmup_steps`` steps, (step + 1) / W, so the first
    update already moves; then ``constant`` stays at 1, and ``cosine`` / ``linear`` decay from 1
    towards 0 over the remaining steps of the run, reaching 0 at step ``total_steps``:
    with progress p = (step - W) / (total_steps - W), cosine gives (1 + cos(πp)) / 2 and linear
    1 - p. ``total_steps`` is ``train.epochs`` times :func:`steps_per_epoch`: a run that stops
    earlier (early stopping, ``train.max_seconds``) ends before the rate reaches 0; the decay is
    not compressed to fit.

    >>> tc = TrainConfig(lr_warmup_steps=2, lr_schedule="linear")
    >>> [lr_factor(step, tc, 6) for step in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    """
    warmup = tc.lr_warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if tc.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if tc.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def make_schedulers(
    optimizers: list[torch.optim.Optimizer], tc: TrainConfig, total_steps: int
) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """A :class:`torch.optim.lr_scheduler.LambdaLR` per optimiser following :func:`lr_factor`,
    stepped after every optimiser step; none with the defaults (constant, no warm-up), so those
    runs compute exactly what they did before schedules existed.

    Raises:
        ConfigError: a decaying schedule whose warm-up covers every step of the run.
    """
    if tc.lr_schedule == "constant" and not tc.lr_warmup_steps:
        return []
    if tc.lr_schedule != "constant" and tc.lr_warmup_steps >= total_steps:
        raise ConfigError(
            f"train.lr_warmup_steps={tc.lr_warmup_steps} covers all {total_steps} steps of the "
            f"run (train.epochs x steps per epoch), so train.lr_schedule={tc.lr_schedule} never "
            "decays; lower the warm-up or use train.lr_schedule=constant"
        )
    return [
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, tc, total_steps))
        for opt in optimizers
    ]


def make_batches(
    lengths: torch.Tensor, batch_size: int, bucket_by_length: bool, generator: torch.Generator
) -> list[torch.Tensor]:
    """Shuffled batches of row indices.

    With ``bucket_by_length`` the shuffled rows are cut into groups of 32 batches, each group sorted
    by length before it is split, and the batch order shuffled again: batches then hold sequences of
    similar length, so trimming the common left padding saves most of the compute on short-sequence
    data (Beauty: median 6 of 50 positions) while every epoch still visits every row once in a
    random order.
    """
    order = torch.randperm(lengths.shape[0], generator=generator)
    if not bucket_by_length:
        return list(order.split(batch_size))
    batches: list[torch.Tensor] = []
    for group in order.split(batch_size * 32):
        group = group[torch.argsort(lengths[group], stable=True)]
        batches.extend(group.split(batch_size))
    shuffle = torch.randperm(len(batches), generator=generator)
    return [batches[i] for i in shuffle]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _postfix(loss: float, monitor: StalenessMonitor | None) -> dict[str, str]:
    """The progress bar's figures: loss, and the index recall of the last staleness probe."""
    figures = {"loss": f"{loss:.4f}"}
    if monitor is not None and monitor.last_recall is not None:
        figures["recall@k"] = f"{monitor.last_recall:.3f}"
    return figures
