"""Training: SASRec with a chosen negative sampler and loss, early stopping on validation NDCG@10.

``train(config, out_dir)`` is the whole job: load data, build the model, the sampler (and its item
index for ``ann``), train with Adam, evaluate on validation every few epochs, keep the best
checkpoint, and evaluate the test split once at the end with it. Every record goes to
``metrics.jsonl`` in the run folder, next to the resolved ``config.yaml`` and ``results.json``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from annsample import data as data_mod
from annsample.config import RunConfig, dump_config
from annsample.errors import RunError
from annsample.evaluate import evaluate_ranking
from annsample.losses import bce_loss, full_ce_loss, gbce_loss, sampled_softmax_loss
from annsample.model import SASRec, count_parameters
from annsample.samplers import (
    AnnSampler,
    DNSSampler,
    ExactSampler,
    Exclusions,
    PoolSampler,
    PopularitySampler,
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
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{config.name}"


def prepare_run_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Create the run folder; refuse to reuse a non-empty one unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"run folder {out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(
                f"run folder {out} already exists and is not empty; choose another --out, or pass "
                "--overwrite to replace it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


class MetricsLog:
    """Step-keyed JSONL records with namespaced keys (``train/loss``, ``eval/valid/ndcg@10``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def write(self, step: int, **values: Any) -> None:
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

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

    @property
    def n_items(self) -> int:
        return self.split.n_items


def prepare_data(config: RunConfig) -> Prepared:
    """Load the dataset named by the config and build the leave-one-out tensors."""
    if config.data.path == "synthetic":
        from annsample.synthetic import synthetic_dataset

        dataset = synthetic_dataset(
            n_items=config.data.synthetic_items,
            n_users=config.data.synthetic_users,
            seed=config.seed,
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


def make_index_refresher(config: RunConfig, dim: int):
    """An :class:`IndexRefresher` over an :class:`ItemIndex` configured by ``sampler.index``."""
    from annsample.index import ItemIndex
    from annsample.refresh import IndexRefresher

    ic = config.sampler.index

    def factory() -> ItemIndex:
        return ItemIndex(
            dim,
            nlist=ic.nlist,
            nprobe=ic.nprobe,
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
    return make_schedule(
        "adaptive",
        drift_threshold=ic.drift_threshold or None,
        recall_threshold=ic.recall_threshold or None,
        check_every=ic.check_every,
        retrain_every=ic.retrain_every,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_exclusions(
    prepared: Prepared,
    users: np.ndarray,
    row: torch.Tensor,
    positives: torch.Tensor,
    exclude_history: bool,
    device: torch.device,
) -> Exclusions:
    """Exclusions for the real positions of a batch of users (rows = batch rows)."""
    n_items = prepared.n_items
    if not exclude_history:
        empty = torch.empty((len(users), 0), dtype=torch.int64, device=device)
        return Exclusions(empty, row, positives, n_items)
    history = data_mod.pad_rows(prepared.history_indptr, prepared.history_items, users, n_items + 1)
    return Exclusions(torch.as_tensor(history, device=device), row, positives, n_items)


def evaluate_model(
    model: SASRec, prepared: Prepared, stage: str, config: RunConfig, device: torch.device
) -> dict[str, float]:
    """Full-ranking metrics of ``model`` on the validation or test targets."""
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
            users=eval_users(split.n_users, config.train.eval_users, config.seed),
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


def train(config: RunConfig, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Train, early-stop on validation NDCG@10, test the best checkpoint once; returns results.

    Writes into ``out_dir``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``best.pt``,
    ``results.json``.
    """
    out = prepare_run_dir(out_dir, overwrite)
    dump_config(config, out / "config.yaml")
    tc = config.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = resolve_device(tc.device)
    seed_everything(config.seed)
    prepared = prepare_data(config)
    split = prepared.split
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

    refresher = schedule = None
    if config.loss.name != "full_ce" and config.sampler.name == "ann":
        refresher = make_index_refresher(config, config.model.hidden_size)
        schedule = make_refresh_schedule(config)
        item_ids = torch.arange(1, split.n_items + 1, device=device)
        refresher.build(_index_snapshot(model), step=0, ids=item_ids)
    sampler = build_sampler(config, prepared, refresher) if config.loss.name != "full_ce" else None
    monitor = (
        StalenessMonitor(model, prepared, config, sampler, device)
        if refresher is not None
        else None
    )
    warmup = UniformSampler()

    log = MetricsLog(out / "metrics.jsonl")
    inputs = torch.as_tensor(prepared.train_inputs)
    targets = torch.as_tensor(prepared.train_targets)
    lengths = (inputs > 0).sum(dim=1).clamp(min=1)  # (U',) real input positions per sequence
    best_ndcg, best_epoch, bad_evals, step = -1.0, 0, 0, 0
    epoch_seconds: list[float] = []
    k = config.sampler.num_negatives
    try:
        for epoch in range(1, tc.epochs + 1):
            model.train()
            t0 = time.perf_counter()
            batches = make_batches(lengths, tc.batch_size, tc.bucket_by_length, order_generator)
            if tc.max_steps_per_epoch:
                batches = batches[: tc.max_steps_per_epoch]
            total_loss = 0.0
            bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=not tc.show_progress)
            for batch in bar:
                width = int(lengths[batch].max())  # trim the all-padding left columns
                seq = inputs[batch, -width:].to(device)
                tgt = targets[batch, -width:].to(device)
                loss = _step_loss(
                    model,
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
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in optimizers:
                    opt.step()
                step += 1
                total_loss += loss.item()
                if step % tc.log_every == 0:
                    log.write(step, **{"train/loss": loss.item(), "train/epoch": epoch})
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if refresher is not None:
                    monitor.after_step(refresher, schedule, step, epoch_end=False, log=log)
            if refresher is not None:
                monitor.after_step(refresher, schedule, step, epoch_end=True, log=log)
            seconds = time.perf_counter() - t0
            epoch_seconds.append(seconds)
            mean_loss = total_loss / max(len(batches), 1)
            log.write(
                step,
                **{
                    "train/epoch_loss": mean_loss,
                    "train/epoch": epoch,
                    "train/epoch_seconds": seconds,
                },
            )
            if epoch % tc.eval_every and epoch != tc.epochs:
                logger.info("epoch %d: loss %.4f (%.1f s)", epoch, mean_loss, seconds)
                continue
            valid = evaluate_model(model, prepared, "valid", config, device)
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
            if valid["ndcg@10"] > best_ndcg:
                best_ndcg, best_epoch, bad_evals = valid["ndcg@10"], epoch, 0
                torch.save(model.state_dict(), out / "best.pt")
            else:
                bad_evals += 1
                if bad_evals >= tc.patience:
                    logger.info("early stop at epoch %d (best epoch %d)", epoch, best_epoch)
                    break
    finally:
        if refresher is not None:
            refresher.close()

    model.load_state_dict(torch.load(out / "best.pt", map_location=device, weights_only=True))
    valid = evaluate_model(model, prepared, "valid", config, device)
    test = evaluate_model(model, prepared, "test", config, device)
    log.write(step, **{f"eval/test/{key}": value for key, value in test.items()})
    log.close()
    results = {
        "name": config.name,
        "best_epoch": best_epoch,
        "epochs_run": len(epoch_seconds),
        "steps": step,
        "seconds_per_epoch": float(np.median(epoch_seconds)) if epoch_seconds else 0.0,
        "valid": valid,
        "test": test,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    logger.info("test: %s", ", ".join(f"{key} {value:.4f}" for key, value in test.items()))
    return results


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
    mode at probe time), with their history and validation target excluded. Figures are logged just
    before every refresh (when the index is at its stalest) and every ``probe_every`` steps.
    """

    def __init__(
        self, model: SASRec, prepared: Prepared, config: RunConfig, sampler, device
    ) -> None:
        from annsample.staleness import probe_exclusions

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
        self.built = _index_snapshot(model) if self.keep_built else None

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
        stats: dict[str, float] = {}
        if schedule.needs_stats(step) or (self.probe_every and step % self.probe_every == 0):
            stats = self.measure()
        kind = schedule.should_refresh(
            step,
            epoch_end,
            {"drift": stats.get("index/drift", 0.0), "recall": stats.get("index/recall@k", 1.0)},
        )
        if kind is not None and not stats:
            stats = self.measure()
        if kind is not None:
            t0 = time.perf_counter()
            snapshot = _index_snapshot(self.model)
            refresher.request(kind, snapshot, step)
            stats["index/request_seconds"] = time.perf_counter() - t0
            stats["index/refresh"] = kind
            if self.keep_built:
                self.built = snapshot
        if stats:
            log.write(step, **stats, **refresher.stats(step))


def _step_loss(
    model, seq, tgt, prepared, batch, config, sampler, warmup, k, step, generator, device
):
    h = model.encode(seq)  # (B, T, d)
    mask = tgt > 0
    h_pos = h[mask]  # (P, d) real positions only
    positives = tgt[mask]  # (P,)
    item_embeddings = model.item_embeddings
    if config.loss.name == "full_ce":
        return full_ce_loss(h_pos, item_embeddings, positives)
    row = mask.nonzero()[:, 0]  # (P,) batch row of each position
    users = prepared.train_users[batch.numpy()]
    exclusions = batch_exclusions(
        prepared, users, row, positives, config.sampler.exclude_history, device
    )
    active = warmup if step < config.sampler.warmup_steps else sampler
    with torch.no_grad():
        negatives = active.sample(
            h_pos.detach(),
            item_embeddings.detach(),
            exclusions,
            k,
            generator,
            sequence_queries=h[:, -1].detach(),
        )
    pos_logits = (h_pos * model.item_vectors(positives)).sum(dim=1)  # (P,)
    neg_logits = torch.einsum("pd,pkd->pk", h_pos, model.item_vectors(negatives.ids))  # (P, k)
    name = config.loss.name
    if name == "bce":
        return bce_loss(pos_logits, neg_logits)
    if name == "gbce":
        return gbce_loss(pos_logits, neg_logits, prepared.n_items, config.loss.gbce_t)
    log_q = negatives.log_q if config.loss.logq_correction else None
    return sampled_softmax_loss(pos_logits, neg_logits, log_q)
