"""Training: SASRec with a chosen negative sampler and loss, early stopping on validation NDCG@10.

``train(config, out_dir)`` is the whole job: load data, build the model, the sampler (and its item
index for ``ann``), train with Adam, evaluate on validation every few epochs, keep the best
checkpoint, and evaluate the test split once at the end with it. Every record goes to
``metrics.jsonl`` in the run folder, next to the resolved ``config.yaml`` and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from annsample import checkpoint as checkpoint_mod
from annsample import data as data_mod
from annsample import distributed
from annsample.api import sample_negatives, sampled_logits, sampled_loss
from annsample.config import RunConfig, config_to_dict, dump_config
from annsample.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ItemIndexError,
    NumericalError,
    RunError,
    SamplerError,
)
from annsample.evaluate import evaluate_ranking
from annsample.losses import full_ce_loss
from annsample.model import SASRec, count_parameters
from annsample.samplers import (
    AnnSampler,
    DNSSampler,
    ExactSampler,
    PoolSampler,
    PopularitySampler,
    Sampler,
    UniformSampler,
)

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """ "auto" picks CUDA when available; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device=cuda but torch sees no GPU; use train.device=cpu or auto")
    return torch.device(name)


def default_run_dir(config: RunConfig) -> Path:
    """``runs/<date>-<name>``, with characters a folder name cannot hold replaced by ``_``."""
    name = re.sub(r"[^\w.+-]", "_", config.name).lstrip(".") or "run"
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{name}"


def check_run_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse a run folder that is a file, or non-empty without ``overwrite``; touches nothing."""
    out = Path(out_dir)
    if "\0" in str(out):
        raise RunError(f"run folder {str(out)!r} contains a NUL byte; choose another --out")
    if out.exists() and not out.is_dir():
        raise RunError(f"run folder {out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        resumable = (
            " (or --resume it: it has checkpoints)" if checkpoint_mod.list_checkpoints(out) else ""
        )
        raise RunError(
            f"run folder {out} already exists and is not empty; choose another --out, or pass "
            f"--overwrite to replace it{resumable}"
        )
    return out


def prepare_run_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Create the run folder; refuse to reuse a non-empty one unless ``overwrite``."""
    out = check_run_dir(out_dir, overwrite)
    try:
        if out.exists() and any(out.iterdir()):
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(
            f"cannot create run folder {out} ({error.strerror or error}); choose a writable --out"
        ) from None
    return out


class MetricsLog:
    """Step-keyed JSONL records with namespaced keys (``train/loss``, ``eval/valid/ndcg@10``).

    ``resume_at`` (a byte offset from :meth:`sync`) drops every record written after it, so a
    resumed run's log reads as the uninterrupted run's.
    """

    def __init__(self, path: Path, resume_at: int | None = None) -> None:
        self.path = path
        if resume_at is not None:
            size = path.stat().st_size if path.is_file() else 0
            if size < resume_at:
                raise CheckpointError(
                    f"{path} holds {size} bytes but held {resume_at} when the checkpoint was "
                    "written, so records are missing; restore it, or start a new run"
                )
            os.truncate(path, resume_at)
        self._file = path.open("a", encoding="utf-8")

    def write(self, step: int, **values: Any) -> None:
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> int:
        """Flush to disk (before a checkpoint refers to it); returns the log's size in bytes."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


@dataclass
class Prepared:
    """Everything derived from the dataset that training and evaluation need."""

    split: data_mod.LeaveOneOutSplit
    train_inputs: np.ndarray  # (U', T) users with at least one training position
    train_targets: np.ndarray  # (U', T)
    train_users: np.ndarray  # (U',) row of each training sample in the split
    history_indptr: np.ndarray
    history_items: np.ndarray
    popularity: np.ndarray
    catalog: Any = None  # the SyntheticCatalog (for its oracle) when data.path == "synthetic"

    @property
    def n_items(self) -> int:
        return self.split.n_items


def prepare_data(config: RunConfig) -> Prepared:
    """Load the dataset named by the config and build the leave-one-out tensors."""
    if "\0" in config.data.path:
        raise DataError(f"data.path {config.data.path!r} contains a NUL byte; fix the path")
    catalog = None
    if config.data.path == "synthetic":
        from annsample.scale import check_memory
        from annsample.synthetic import SyntheticParams, synthetic_catalog

        dc = config.data
        users = SyntheticParams(dc.synthetic_items, dc.synthetic_users).resolved_users()
        check_memory(config, dc.synthetic_items, users)
        catalog, dataset = synthetic_catalog(
            n_items=config.data.synthetic_items,
            n_users=config.data.synthetic_users,
            seed=config.data.synthetic_seed,
        )
    else:
        dc = config.data
        table = dc.format == "interactions" or (
            dc.format == "auto" and Path(dc.path).suffix.lower() in (".csv", ".tsv")
        )
        columns = {"user_col": dc.user_col, "item_col": dc.item_col, "time_col": dc.time_col}
        dataset = data_mod.load_dataset(dc.path, fmt=dc.format, **(columns if table else {}))
    split = data_mod.leave_one_out(dataset)
    inputs, targets = data_mod.training_tensors(split, config.data.max_len)
    users = np.flatnonzero((targets > 0).any(axis=1))
    indptr, items = data_mod.history_csr(split, "train")
    return Prepared(
        split=split,
        train_inputs=inputs[users],
        train_targets=targets[users],
        train_users=users,
        history_indptr=indptr,
        history_items=items,
        popularity=data_mod.item_popularity(split),
        catalog=catalog,
    )


def build_sampler(config: RunConfig, prepared: Prepared, index_source=None):
    """The sampler the config names (``index_source`` is the ann sampler's index or refresher)."""
    s = config.sampler
    if s.name == "uniform":
        return UniformSampler()
    if s.name == "popularity":
        return PopularitySampler(prepared.popularity, beta=s.beta)
    if s.name == "exact":
        return ExactSampler(alpha=s.alpha)
    if s.name == "exact_gumbel":
        from annsample.exact_gumbel import GumbelExactSampler

        return GumbelExactSampler(alpha=s.alpha, precision=s.matmul_precision)
    if s.name == "pool":
        return PoolSampler(alpha=s.alpha, pool_size=s.pool_size)
    if s.name == "dns":
        return DNSSampler(candidates=s.pool_size)
    if s.name == "ann":
        return AnnSampler(
            index_source,
            alpha=s.alpha,
            candidates=s.candidates,
            epsilon=s.epsilon,
            query=s.query,
            tail_samples=s.tail_samples,
        )
    raise ValueError(f"unknown sampler {s.name!r}")  # config validation makes this unreachable


def make_index_refresher(config: RunConfig, dim: int, n_items: int | None = None):
    """An :class:`IndexRefresher` over an :class:`ItemIndex` configured by ``sampler.index``.

    ``n_items`` (the catalog size) resolves ``nlist: 0`` / ``nprobe: 0`` by the default rule
    (:func:`annsample.index.resolve_nlist_nprobe`).
    """
    from annsample.index import ItemIndex, resolve_nlist_nprobe
    from annsample.refresh import IndexRefresher

    ic = config.sampler.index
    if n_items is None:
        if not (ic.nlist and ic.nprobe):
            raise ConfigError(
                "sampler.index.nlist / nprobe = 0 follow the catalog size: pass n_items to "
                "make_index_refresher, or set both explicitly"
            )
        nlist, nprobe = ic.nlist, ic.nprobe
    else:
        try:
            nlist, nprobe = resolve_nlist_nprobe(ic.nlist, ic.nprobe, n_items)
        except ItemIndexError as error:
            raise ConfigError(f"sampler.index: {error}") from None

    def factory() -> ItemIndex:
        return ItemIndex(
            dim,
            nlist=nlist,
            nprobe=nprobe,
            backend=ic.backend,
            metric=ic.metric,
            seed=config.seed,
        )

    return IndexRefresher(factory, asynchronous=ic.asynchronous)


def make_refresh_schedule(config: RunConfig):
    from annsample.refresh import make_schedule

    ic = config.sampler.index
    if ic.refresh == "steps":
        return make_schedule("steps", n=ic.refresh_every, retrain_every=ic.retrain_every)
    if ic.refresh == "epoch":
        return make_schedule("epoch", retrain_every=ic.retrain_every)
    if ic.refresh == "never":
        return make_schedule("never")
    if not ic.drift_threshold and not ic.recall_threshold:
        raise ConfigError(
            "sampler.index.refresh=adaptive needs sampler.index.drift_threshold > 0 or "
            "sampler.index.recall_threshold > 0 (or both); with neither it never refreshes: use "
            "sampler.index.refresh=never for that"
        )
    return make_schedule(
        "adaptive",
        drift_threshold=ic.drift_threshold or None,
        recall_threshold=ic.recall_threshold or None,
        check_every=ic.check_every,
        retrain_every=ic.retrain_every,
    )


def check_sampler_fits(config: RunConfig, prepared: Prepared) -> None:
    """Refuse, before any file is written, sampler settings the catalog cannot satisfy."""
    s, n_items = config.sampler, prepared.n_items
    if config.loss.name == "full_ce":
        return
    if s.name == "ann":
        from annsample.index import resolve_nlist_nprobe

        try:
            resolve_nlist_nprobe(s.index.nlist, s.index.nprobe, n_items)
        except ItemIndexError as error:
            raise ConfigError(f"sampler.index: {error}") from None
    if s.name == "ann" and s.candidates > n_items:
        raise ConfigError(
            f"sampler.candidates={s.candidates} is more than the catalog's {n_items} items; "
            f"lower it to at most {n_items} (a few hundred is typical)"
        )
    if s.exclude_history:
        seen = np.diff(prepared.history_indptr)[prepared.train_users]  # distinct items per user
        full = int((seen >= n_items).sum())
        if full:
            raise SamplerError(
                f"{full} user(s) have interacted with all {n_items} items, so no negative can be "
                "drawn for them; drop those users from the dataset or set "
                "sampler.exclude_history=false"
            )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate_model(
    model: SASRec,
    prepared: Prepared,
    stage: str,
    config: RunConfig,
    device: torch.device,
    user_count: int | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of ``model`` on the validation or test targets.

    ``user_count`` overrides ``train.eval_users`` (the fixed user subset; 0 = all users).
    """
    split = prepared.split
    inputs, targets = data_mod.eval_tensors(split, stage, config.data.max_len)
    indptr, items = data_mod.history_csr(split, stage)
    was_training = model.training
    model.eval()
    try:
        metrics, _ = evaluate_ranking(
            model.encode,
            model.item_embeddings,
            inputs,
            targets,
            indptr,
            items,
            batch_size=config.train.eval_batch_size,
            device=device,
            users=eval_users(
                split.n_users,
                config.train.eval_users if user_count is None else user_count,
                config.seed,
            ),
        )
    finally:
        model.train(was_training)
    return metrics


def eval_users(n_users: int, count: int, seed: int) -> np.ndarray | None:
    """A fixed random subset of ``count`` users to evaluate (None = all users)."""
    if not count or count >= n_users:
        return None
    return np.sort(np.random.default_rng(seed + 3).choice(n_users, size=count, replace=False))


def _optimizers(model: SASRec, config: RunConfig) -> list[torch.optim.Optimizer]:
    lr, wd = config.train.lr, config.train.weight_decay
    if config.model.sparse_embeddings:
        dense = [p for n, p in model.named_parameters() if not n.startswith("item_embedding.")]
        return [
            torch.optim.SparseAdam([model.item_embedding.weight], lr=lr),
            torch.optim.Adam(dense, lr=lr, weight_decay=wd),
        ]
    return [torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)]


@dataclass
class Progress:
    """Where training stands: what a checkpoint holds besides weights, optimisers and RNGs."""

    step: int = 0
    next_epoch: int = 1  # the epoch to run (or to finish, when next_batch > 0)
    next_batch: int = 0  # batches of next_epoch already trained
    epoch_loss_sum: float = 0.0  # sum of train/loss over those batches
    epoch_elapsed: float = 0.0  # seconds spent on those batches
    best_ndcg: float = -1.0
    best_epoch: int = 0
    bad_evals: int = 0
    stopped: bool = False  # early stopping fired
    epoch_seconds: list[float] = field(default_factory=list)
    best_digest: str = ""  # checkpoint.state_digest of the weights in best.pt


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
    out = Path(out_dir)
    ctx = distributed.init(resolve_device(config.train.device))  # no-op unless torchrun started us
    checkpoint: dict[str, Any] | None = None
    if resume:
        checkpoint_path, checkpoint, corrupt = _resume_point(out)
        changed = checkpoint_mod.check_config(checkpoint, config_to_dict(config), checkpoint_path)
    elif ctx.is_main:
        check_run_dir(out, overwrite)
    tc = config.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
        _set_faiss_threads(tc.num_threads)
    device = distributed.device_for(ctx, resolve_device(tc.device))
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
    optimizers = _optimizers(model, config)
    sampler_generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    order_generator = torch.Generator().manual_seed(config.seed + 2)
    generators = {"sampler": sampler_generator, "order": order_generator}
    distributed.decorrelate(ctx, config.seed, 0, [sampler_generator])

    refresher = schedule = monitor = None
    if config.loss.name != "full_ce" and config.sampler.name == "ann":
        refresher = make_index_refresher(config, config.model.hidden_size, prepared.n_items)
        schedule = make_refresh_schedule(config)
        if ctx.enabled:
            refresher = distributed.AgreedRefresher(refresher, ctx)
    try:
        if refresher is not None and checkpoint is None:
            item_ids = torch.arange(1, split.n_items + 1, device=device)
            refresher.build(_index_snapshot(model), step=0, ids=item_ids)
        sampler = (
            build_sampler(config, prepared, refresher) if config.loss.name != "full_ce" else None
        )
        if refresher is not None:
            monitor = StalenessMonitor(model, prepared, config, sampler, device)
        progress = Progress()
        last_checkpoint: Path | None = None
        if checkpoint is not None:
            progress = _restore(checkpoint, model, optimizers, generators, refresher, schedule)
            distributed.decorrelate(ctx, config.seed, progress.step, [sampler_generator])
            if monitor is not None and monitor.keep_built:
                built = checkpoint["index"]["built"]
                monitor.built = None if built is None else built.to(device)
            last_checkpoint = checkpoint_path

        # Everything above only reads; the run folder is created or changed from here on.
        if not ctx.is_main:  # rank 0 owns the run folder; the others log beside it
            distributed.barrier(ctx)
            log = MetricsLog(distributed.rank_log_path(out, ctx))
        elif checkpoint is None:
            out = prepare_run_dir(out, overwrite)
            dump_config(config, out / "config.yaml")
            log = MetricsLog(out / "metrics.jsonl")
        else:
            log = MetricsLog(out / "metrics.jsonl", resume_at=checkpoint["metrics_offset"])
            checkpoint_mod.set_aside(out, corrupt)
            if changed:
                logger.info("resuming with changed %s", ", ".join(changed))
                dump_config(config, out / "config.yaml")
            logger.info("resuming %s from %s (step %d)", out, checkpoint_path.name, progress.step)
        if ctx.is_main:
            distributed.barrier(ctx)  # the folder is ready for the other ranks' logs
        del checkpoint  # the restored copies live on; free the loaded tensors

        def save(order_state: torch.Tensor) -> Path:
            """A full-state checkpoint; ``order_state`` redraws the current epoch's batches."""
            if not ctx.is_main:
                return None
            bad = _nonfinite_parameters(model)
            if bad:
                raise NumericalError(
                    f"training diverged at step {progress.step}: parameters {', '.join(bad)} hold "
                    "NaN or inf, so they are not checkpointed"
                )
            index = None
            if refresher is not None:
                index = checkpoint_mod.refresher_state(refresher, schedule)
                index["built"] = monitor.built
            state = {
                "step": progress.step,
                "config": config_to_dict(config),
                "catalog": catalog,
                "progress": dataclasses.asdict(progress),
                "model": model.state_dict(),
                "optimizers": [opt.state_dict() for opt in optimizers],
                "rng": checkpoint_mod.capture_rng(
                    {"sampler": sampler_generator.get_state(), "order": order_state}
                ),
                "index": index,
                "metrics_offset": log.sync(),
            }
            return checkpoint_mod.save_checkpoint(out, state, tc.keep_checkpoints)

        inputs = torch.as_tensor(prepared.train_inputs)
        targets = torch.as_tensor(prepared.train_targets)
        lengths = (inputs > 0).sum(dim=1).clamp(min=1)  # (U',) real input positions per sequence
        step = progress.step
        k = config.sampler.num_negatives
        warmup = UniformSampler()
        step_loss = distributed.step_function(ctx, model, _step_loss)  # DDP-wrapped under torchrun
        if ctx.enabled and tc.max_seconds:
            # each rank's clock would end training at a different step and hang the others
            raise ConfigError(
                "train.max_seconds is not supported with several processes yet; set "
                "train.max_seconds=0 and bound the run with train.epochs"
            )
        budget = _Budget(tc.max_seconds, progress)
        for epoch in range(progress.next_epoch, tc.epochs + 1):
            if progress.stopped:
                break
            model.train()
            t0 = time.perf_counter()
            order_state = order_generator.get_state()  # redraws this epoch's batches on resume
            batches = make_batches(lengths, tc.batch_size, tc.bucket_by_length, order_generator)
            if tc.max_steps_per_epoch:
                batches = batches[: tc.max_steps_per_epoch]
            batches = distributed.shard_batches(ctx, batches)
            done, total_loss = progress.next_batch, progress.epoch_loss_sum
            elapsed = progress.epoch_elapsed
            bar = tqdm(
                batches[done:],
                desc=f"epoch {epoch}",
                leave=False,
                initial=done,
                total=len(batches),
                disable=not tc.show_progress or not ctx.is_main,
            )
            for position, batch in enumerate(bar, start=done + 1):
                width = int(lengths[batch].max())  # trim the all-padding left columns
                seq = inputs[batch, -width:].to(device)
                tgt = targets[batch, -width:].to(device)
                loss = step_loss(
                    seq,
                    tgt,
                    prepared,
                    batch,
                    config,
                    sampler,
                    warmup,
                    k,
                    step,
                    sampler_generator,
                    device,
                )
                loss_value = loss.item()
                if not np.isfinite(loss_value):
                    raise NumericalError(
                        f"training diverged at step {step + 1}: the loss is {loss_value} (the "
                        "update was not applied)"
                    )
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                bad = _nonfinite_gradients(model)
                if bad:
                    raise NumericalError(
                        f"training diverged at step {step + 1}: the gradients of "
                        f"{', '.join(bad)} hold NaN or inf (the update was not applied)"
                    )
                for opt in optimizers:
                    opt.step()
                step += 1
                total_loss += loss_value
                if refresher is not None:
                    monitor.after_step(refresher, schedule, step, epoch_end=False, log=log)
                if step % tc.log_every == 0:
                    log.write(step, **{"train/loss": loss_value, "train/epoch": epoch})
                    bar.set_postfix(_postfix(loss_value, monitor), refresh=False)
                if budget.spent():
                    batches = batches[:position]  # the epoch ends here; so does training
                    break
                # the epoch-end checkpoint below covers the last batch
                if (
                    tc.checkpoint_every
                    and step % tc.checkpoint_every == 0
                    and position < len(batches)
                ):
                    progress.step, progress.next_epoch, progress.next_batch = step, epoch, position
                    progress.epoch_loss_sum = total_loss
                    progress.epoch_elapsed = elapsed + time.perf_counter() - t0
                    last_checkpoint = save(order_state)
            if refresher is not None:
                monitor.after_step(refresher, schedule, step, epoch_end=True, log=log)
            seconds = elapsed + time.perf_counter() - t0
            progress.epoch_seconds.append(seconds)
            mean_loss = total_loss / max(len(batches), 1)
            log.write(
                step,
                **{
                    "train/epoch_loss": mean_loss,
                    "train/epoch": epoch,
                    "train/epoch_seconds": seconds,
                },
            )
            if epoch % tc.eval_every and epoch != tc.epochs and not budget.spent():
                logger.info("epoch %d: loss %.4f (%.1f s)", epoch, mean_loss, seconds)
            else:
                valid = distributed.broadcast(
                    ctx,
                    evaluate_model(model, prepared, "valid", config, device, tc.valid_users or None)
                    if ctx.is_main
                    else None,
                )
                log.write(
                    step,
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
                    if ctx.is_main:
                        progress.best_digest = _save_best(model, out / "best.pt")
                else:
                    progress.bad_evals += 1
                    if progress.bad_evals >= tc.patience:
                        logger.info(
                            "early stop at epoch %d (best epoch %d)", epoch, progress.best_epoch
                        )
                        progress.stopped = True
            if budget.spent():
                logger.info("train.max_seconds=%g spent at step %d", tc.max_seconds, step)
                progress.stopped = True
            progress.step, progress.next_epoch, progress.next_batch = step, epoch + 1, 0
            progress.epoch_loss_sum = progress.epoch_elapsed = 0.0
            last_checkpoint = save(order_generator.get_state())
    except NumericalError as error:
        kept = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint is not None
            else "no checkpoint was written before it"
        )
        raise NumericalError(
            f"{error}; {kept}. The run is deterministic, so resuming repeats this: lower "
            "train.lr (or check the data) and start a new run"
        ) from None
    finally:
        if refresher is not None:
            refresher.close()

    if not ctx.is_main:  # rank 0 tests the best weights; the others take its results
        log.close()
        results = distributed.broadcast(ctx, None)
        distributed.close(ctx)
        return results
    model.load_state_dict(_load_best(out / "best.pt", progress.best_digest, device))
    valid = evaluate_model(model, prepared, "valid", config, device)
    test = evaluate_model(model, prepared, "test", config, device)
    log.write(progress.step, **{f"eval/test/{key}": value for key, value in test.items()})
    log.close()
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
    if prepared.catalog is not None:
        results.update(_oracle_results(prepared, config, test))
    checkpoint_mod.atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    # Checkpoints exist to resume an interrupted run; a finished run's outputs are best.pt and
    # results.json (and at a million items three checkpoints hold gigabytes).
    shutil.rmtree(checkpoint_mod.checkpoint_folder(out), ignore_errors=True)
    logger.info("test: %s", ", ".join(f"{key} {value:.4f}" for key, value in test.items()))
    distributed.broadcast(ctx, results)
    distributed.close(ctx)
    return results


def _set_faiss_threads(count: int) -> None:
    """FAISS's OpenMP pool follows ``train.num_threads`` too (on a shared machine an idle-spinning
    pool of every core's threads costs more than it searches)."""
    try:
        import faiss
    except ImportError:  # faiss is optional; without it there is no index to search
        return
    faiss.omp_set_num_threads(count)


class _Budget:
    """``train.max_seconds`` of wall clock for the training loop (0 = none); resumes keep counting."""

    def __init__(self, seconds: float, progress: Progress) -> None:
        self.seconds = seconds
        self.start = time.perf_counter() - sum(progress.epoch_seconds) - progress.epoch_elapsed

    def spent(self) -> bool:
        return bool(self.seconds) and time.perf_counter() - self.start >= self.seconds


def _postfix(loss: float, monitor: StalenessMonitor | None) -> dict[str, str]:
    """The progress bar's figures: loss, and the index recall of the last staleness probe."""
    figures = {"loss": f"{loss:.4f}"}
    if monitor is not None and monitor.last_recall is not None:
        figures["recall@k"] = f"{monitor.last_recall:.3f}"
    return figures


def _oracle_results(prepared: Prepared, config: RunConfig, test: dict[str, float]) -> dict:
    """The synthetic catalog's oracle on the same test users, and the model's share of it."""
    from annsample.synthetic import oracle_metrics

    split = prepared.split
    inputs, targets = data_mod.eval_tensors(split, "test", config.data.max_len)
    indptr, items = data_mod.history_csr(split, "test")
    users = eval_users(split.n_users, config.train.eval_users, config.seed)
    oracle, _ = oracle_metrics(prepared.catalog, inputs, targets, indptr, items, users)
    fraction = {
        key: (test[key] / oracle[key] if oracle[key] else 0.0) for key in ("ndcg@10", "hr@10")
    }
    logger.info(
        "oracle: ndcg@10 %.4f hr@10 %.4f; the model reaches %.2f / %.2f of it",
        oracle["ndcg@10"],
        oracle["hr@10"],
        fraction["ndcg@10"],
        fraction["hr@10"],
    )
    return {"oracle": oracle, "fraction_of_oracle": fraction}


def _resume_point(out: Path) -> tuple[Path, dict[str, Any], list[Path]]:
    """The checkpoint to resume ``out`` from (see checkpoint.latest_checkpoint)."""
    if not out.is_dir():
        raise RunError(
            f"run folder {out} does not exist; --resume takes the folder of an interrupted "
            "`annsample train`"
        )
    if (out / "results.json").is_file():
        raise RunError(f"run {out} already finished (it has results.json); nothing to resume")
    return checkpoint_mod.latest_checkpoint(out)


def _restore(
    checkpoint: dict[str, Any],
    model: SASRec,
    optimizers: list[torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    refresher,
    schedule,
) -> Progress:
    """Load weights, optimiser moments, RNGs and the index from a checkpoint; return its progress."""
    try:
        model.load_state_dict(checkpoint["model"])
        for optimizer, state in zip(optimizers, checkpoint["optimizers"], strict=True):
            optimizer.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as error:
        # check_config makes this unreachable for annsample's own checkpoints
        raise CheckpointError(f"the checkpoint does not fit the model: {error}") from None
    checkpoint_mod.restore_rng(checkpoint["rng"], generators)
    if refresher is not None:
        device = next(model.parameters()).device
        checkpoint_mod.restore_refresher(refresher, schedule, checkpoint["index"], device)
    return Progress(**checkpoint["progress"])


def _save_best(model: SASRec, path: Path) -> str:
    """Write the model's weights to ``path`` atomically; returns their digest."""
    state = model.state_dict()
    checkpoint_mod.atomic_save(state, path)
    return checkpoint_mod.state_digest(state)


def _load_best(path: Path, digest: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The best weights, checked against the digest recorded when they were written."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        intact = checkpoint_mod.state_digest(state) == digest
    except Exception as error:  # missing, torn, or not a state dict: the run cannot be tested
        reason = checkpoint_mod.describe_load_error(error)
        raise CheckpointError(f"cannot read {path} ({reason}); start the run again") from None
    if not intact:
        raise CheckpointError(
            f"{path} does not hold the weights of the best epoch this run recorded (it was "
            "written after the checkpoint it resumed from, by a run that then diverged); start "
            "the run again"
        )
    return state


def _nonfinite_gradients(model: SASRec) -> list[str]:
    """Names of parameters whose gradient holds NaN or inf (one device sync for all of them)."""
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    if not named:
        return []
    sums = torch.stack(
        [(grad.coalesce().values() if grad.is_sparse else grad).sum() for _, grad in named]
    )
    finite = torch.isfinite(sums).tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def _nonfinite_parameters(model: SASRec) -> list[str]:
    """Names of parameters holding NaN or inf."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


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


def _index_snapshot(model: SASRec) -> torch.Tensor:
    """A no-grad copy of the item table without the padding row, (N, d) float32."""
    return model.item_embeddings.detach()[1:].float().clone()


class StalenessMonitor:
    """Runs the refresh schedule and measures index staleness on fixed probe queries.

    Probe queries are the last hidden states of a fixed set of validation users (computed in eval
    mode at probe time), with their history and validation target excluded. Figures are logged every
    ``probe_every`` steps, or with ``probe_every`` = 0 just before every refresh (when the index is
    at its stalest), and whenever an adaptive schedule needs them.
    """

    def __init__(
        self, model: SASRec, prepared: Prepared, config: RunConfig, sampler, device
    ) -> None:
        from annsample.staleness import BuiltSnapshots, probe_exclusions

        self.model, self.sampler, self.config = model, sampler, config
        ic = config.sampler.index
        split = prepared.split
        users = eval_users(split.n_users, ic.probe_queries, config.seed + 7)
        users = np.arange(split.n_users) if users is None else users
        inputs, targets = data_mod.eval_tensors(split, "valid", config.data.max_len)
        indptr, items = data_mod.history_csr(split, "valid")
        self.inputs = torch.as_tensor(inputs[users], device=device)
        history = torch.as_tensor(
            data_mod.pad_rows(indptr, items, users, split.n_items + 1), device=device
        )
        self.exclusions = probe_exclusions(
            torch.as_tensor(targets[users], device=device), history, split.n_items
        )
        self.probe_every = ic.probe_every
        # the table the current index was built from (for drift); kept only when it is measured
        self.keep_built = (
            ic.refresh == "adaptive" or ic.probe_every > 0 or split.n_items <= 2_000_000
        )
        self.snapshots = BuiltSnapshots(_index_snapshot(model) if self.keep_built else None)
        self.last_recall: float | None = None  # shown on the progress bar

    @property
    def built(self) -> torch.Tensor | None:
        """The (N, d) table the published index was built from (None when drift is not kept)."""
        return self.snapshots.built

    @built.setter
    def built(self, value: torch.Tensor | None) -> None:
        from annsample.staleness import BuiltSnapshots

        self.snapshots = BuiltSnapshots(value)

    def measure(self) -> dict[str, float]:
        from annsample.staleness import measure_staleness

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                xq = self.model.encode(self.inputs)[:, -1].contiguous()
            items = self.model.item_embeddings.detach()
            return measure_staleness(self.sampler, xq, items, self.built, self.exclusions)
        finally:
            self.model.train(was_training)

    def after_step(self, refresher, schedule, step: int, epoch_end: bool, log: MetricsLog) -> None:
        refresher.poll()  # a background failure surfaces here, in the training thread
        self.snapshots.sync(refresher.current().version)  # an async refresh may have landed
        stats: dict[str, float] = {}
        due = schedule.needs_stats(step) or (self.probe_every and step % self.probe_every == 0)
        if due and not epoch_end:  # the epoch-end call repeats the epoch's last step
            stats = self.measure()
        kind = schedule.should_refresh(
            step,
            epoch_end,
            {"drift": stats.get("index/drift", 0.0), "recall": stats.get("index/recall@k", 1.0)},
        )
        if kind is not None and not stats and not self.probe_every:
            stats = self.measure()
        if kind is not None:
            t0 = time.perf_counter()
            snapshot = _index_snapshot(self.model)
            if not bool(torch.isfinite(snapshot).all()):
                raise NumericalError(
                    f"training diverged at step {step}: the item embeddings hold NaN or inf, so "
                    "the index is not rebuilt from them"
                )
            refresher.request(kind, snapshot, step)
            stats["index/request_seconds"] = time.perf_counter() - t0
            stats["index/refresh"] = kind
            # built once published (at once when synchronous; a skipped async request never is)
            self.snapshots.requested(step, snapshot)
            self.snapshots.sync(refresher.current().version)
        if "index/recall@k" in stats:
            self.last_recall = stats["index/recall@k"]
        if stats:
            log.write(step, **stats, **refresher.stats(step))


def _step_loss(
    model: SASRec,
    seq: torch.Tensor,
    tgt: torch.Tensor,
    prepared: Prepared,
    batch: torch.Tensor,
    config: RunConfig,
    sampler: Sampler | None,
    warmup: Sampler,
    k: int,
    step: int,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """One batch's loss; the sampling and the sampled loss go through the public API.

    ``seq``, ``tgt``: (B, T) int64 inputs and next items (0 = padding); ``batch``: (B,) rows of
    ``prepared.train_inputs``; ``step``: steps done (the warmup sampler serves the first ones).
    """
    h = model.encode(seq)  # (B, T, d)
    mask = tgt > 0
    h_pos = h[mask]  # (P, d) real positions only
    # Before any sampler or index sees them: a NaN query would surface as an obscure sampler error.
    if not bool(torch.isfinite(h_pos).all()):
        raise NumericalError(
            f"training diverged at step {step + 1}: the hidden states hold NaN or inf"
        )
    positives = tgt[mask]  # (P,)
    item_embeddings = model.item_embeddings
    if config.loss.name == "full_ce":
        return full_ce_loss(h_pos, item_embeddings, positives)
    histories = None
    if config.sampler.exclude_history:
        users = prepared.train_users[batch.numpy()]
        rows = data_mod.pad_rows(prepared.history_indptr, prepared.history_items, users, 0)
        histories = torch.as_tensor(rows, device=device)  # (B, H), 0 = padding
    active = warmup if step < config.sampler.warmup_steps else sampler
    negatives = sample_negatives(active, h, tgt, item_embeddings, k, generator, histories)
    pos_logits, neg_logits = sampled_logits(
        h_pos, model.item_vectors(positives), model.item_vectors(negatives.ids)
    )  # (P,), (P, k)
    log_q = negatives.log_q if config.loss.logq_correction else None
    return sampled_loss(
        config.loss.name,
        pos_logits,
        neg_logits,
        log_q,
        n_items=prepared.n_items,
        gbce_t=config.loss.gbce_t,
    )
