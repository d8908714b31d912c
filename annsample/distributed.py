"""Training on several processes with torch.distributed: DDP over gloo (CPU) or NCCL (GPU).

A process group exists only when the elastic launcher started us (``torchrun --nproc_per_node N
-m annsample.cli train ...`` or ``annsample train --nproc N``, which calls it): ``WORLD_SIZE`` is
then set. Without it every helper here is a no-op, so a one-process run is unchanged.

How a run is split (``train.batch_size`` stays the *global* batch):

- every rank draws the same batch order (same seed) and trains on rows ``rank::world`` of each
  global batch; batches with fewer rows than ranks are skipped on every rank;
- the step's loss runs inside :class:`~torch.nn.parallel.DistributedDataParallel`, which averages
  the gradients, sparse item-embedding gradients included (gloo all-reduces a sparse tensor by
  gathering every rank's rows, so its size grows with the ranks' distinct items, not with N);
- DDP keeps the weights identical, so each rank refreshes its own index from identical embeddings
  at the same steps; with ``asynchronous`` refresh, :class:`AgreedRefresher` swaps in a new index
  only at a step where every rank has published the same version (one all-reduce per step);
- rank 0 evaluates, writes ``metrics.jsonl``, ``best.pt``, checkpoints and ``results.json``; the
  validation metrics are broadcast, so the early-stopping decision is the same on every rank;
- every rank logs its index version and centroid digest (``ranks/rank<r>.jsonl`` beside the run's
  metrics for ranks > 0).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from annsample.errors import RunError

logger = logging.getLogger(__name__)

# Ranks wait this long for each other (evaluation on rank 0 included) before the job fails.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: ``rank`` of ``world_size`` (1 = no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """ "auto" picks CUDA when available; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("train.device=cuda but torch sees no GPU; use train.device=cpu or auto")
    return torch.device(name)


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by the elastic launcher (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RunError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun or "
            "annsample train --nproc N"
        ) from None


def is_main_process() -> bool:
    """True unless the launcher made this process a rank other than 0."""
    return os.environ.get("RANK", "0") == "0"


def init(device: torch.device) -> DistContext:
    """Join the process group the launcher set up (gloo on CPU, NCCL on CUDA); no-op alone."""
    world = launched_world_size()
    if world <= 1:
        return DistContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=TIMEOUT)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    logger.info("rank %d of %d (%s)", ctx.rank, ctx.world_size, dist.get_backend())
    return ctx


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """Each rank gets its own GPU (``cuda:<local rank>``); CPU stays CPU."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def close(ctx: DistContext) -> None:
    """Leave the process group once every rank is done with it: a rank that tore its connections
    down while another still had a collective in flight made that rank abort (``terminate
    called without an active exception``, exit code -6) about one run in six."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (a collective: every rank calls it)."""
    if not ctx.enabled:
        return flag
    holder = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(holder, op=dist.ReduceOp.MAX)
    return bool(holder.item())


def broadcast(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable value)."""
    if not ctx.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def decorrelate(ctx: DistContext, seed: int, step: int, generators: list[torch.Generator]) -> None:
    """Give ranks > 0 their own dropout and sampler streams (rank 0 keeps the run's own, so a
    one-process run and rank 0 start alike). Called after the model is built (weights must be
    identical: DDP also broadcasts rank 0's) and again after a resume restored rank 0's RNGs."""
    if not ctx.enabled or ctx.is_main:
        return
    base = (seed, ctx.rank, step)
    torch.manual_seed(hash(base) & 0x7FFF_FFFF)
    for offset, generator in enumerate(generators):
        generator.manual_seed(hash((*base, offset)) & 0x7FFF_FFFF)


def shard_batches(ctx: DistContext, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's rows of each global batch: ``batch[rank::world]``.

    Strided rather than contiguous, because length-bucketed batches are sorted by length and a
    contiguous split would hand one rank all the long sequences. Batches with fewer rows than
    ranks are dropped on every rank (each rank must run every step).
    """
    if not ctx.enabled:
        return batches
    kept = [batch for batch in batches if len(batch) >= ctx.world_size]
    if len(kept) < len(batches):
        logger.debug(
            "%d batch(es) smaller than %d ranks skipped", len(batches) - len(kept), ctx.world_size
        )
    return [batch[ctx.rank :: ctx.world_size] for batch in kept]


class _StepModule(nn.Module):
    """DDP wraps ``forward``; this makes the whole step's loss the forward pass."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, *args: Any) -> torch.Tensor:
        return self._loss_fn(self.model, *args)


def step_function(
    ctx: DistContext, model: nn.Module, loss_fn: Callable[..., torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """``loss_fn(model, *args)`` as a callable of ``*args``; under DDP its backward averages the
    gradients over ranks (DDP also broadcasts rank 0's weights once, here)."""
    if not ctx.enabled:
        return functools.partial(loss_fn, model)
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(
        _StepModule(model, loss_fn),
        device_ids=[device.index] if device.type == "cuda" else None,
    )


def rank_log_path(out: Path, ctx: DistContext) -> Path:
    """Where rank ``r`` > 0 writes its records (rank 0 writes the run's ``metrics.jsonl``);
    creates the ``ranks`` folder."""
    folder = out / "ranks"
    folder.mkdir(exist_ok=True)
    return folder / f"rank{ctx.rank}.jsonl"


def index_digest(index: Any) -> str:
    """A short SHA-256 of an ItemIndex's version, ids and centroids (what its search depends on
    besides the stored vectors, which follow from the same embeddings)."""
    state = index.state_dict(with_vectors=False)
    digest = hashlib.sha256(str(state["version"]).encode())
    for key in ("ids", "centroids", "norms"):
        tensor = state[key]
        if tensor is not None:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class AgreedRefresher:
    """An IndexRefresher whose ``current()`` index is the same version on every rank.

    Synchronous refreshes already publish at the same steps on every rank. Asynchronous ones finish
    at different times, so the sampler keeps the agreed index until, at some step's ``poll``,
    every rank's newest published version is the same: then all switch together. Everything else
    (``request``, ``state_dict``, ``close``...) goes to the wrapped refresher.
    """

    def __init__(self, refresher: Any, ctx: DistContext) -> None:
        self._inner = refresher
        self._ctx = ctx
        self._agreed = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def build(self, *args: Any, **kwargs: Any) -> Any:
        self._agreed = self._inner.build(*args, **kwargs)
        return self._agreed

    def load_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._inner.load_state_dict(*args, **kwargs)
        self._agreed = self._inner.current()

    def current(self) -> Any:
        if not self._inner.asynchronous or self._agreed is None:
            return self._inner.current()
        return self._agreed

    def poll(self) -> bool:
        busy = self._inner.poll()
        if self._inner.asynchronous and self._ctx.enabled:
            latest = self._inner.current()
            versions = torch.tensor([latest.version, -latest.version], dtype=torch.int64)
            dist.all_reduce(versions, op=dist.ReduceOp.MAX)
            if int(versions[0]) == -int(versions[1]) and latest is not self._agreed:
                self._agreed = latest  # every rank has this version: switch together
        return busy

    def stats(self, step: int | None = None) -> dict[str, Any]:
        stats = self._inner.stats(step)
        index = self.current()
        stats["index/version"] = index.version
        stats["index/digest"] = index_digest(index)
        stats["index/rank"] = self._ctx.rank
        return stats


def launch(nproc: int, argv: list[str], out: Path | None = None) -> None:
    """Run ``annsample <argv>`` on ``nproc`` processes through torch's elastic launcher
    (``torchrun --standalone --nproc_per_node nproc -m annsample.cli <argv>``), in this process.

    Raises:
        RunError: a rank failed (its own error is printed above, by that rank); names the rank,
            its exit code, and how to resume.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", "--nproc_per_node", str(nproc), "-m", "annsample.cli", *argv]
    )
    try:
        run(args)
    except ChildFailedError as error:
        failures = sorted(error.failures.items())
        # the launcher SIGTERMs the survivors once one rank fails: name a rank that failed itself
        causes = [(r, f) for r, f in failures if f.exitcode != -signal.SIGTERM] or failures
        rank, failure = causes[0]
        # exit code 2: the rank printed a user error (bad input) before anything was trained
        user_error = all(f.exitcode == 2 for _, f in causes)
        resume = (
            f"; fix the cause and continue with annsample train --resume {out}"
            if out is not None and not user_error
            else ""
        )
        raise RunError(
            f"distributed training failed: rank {rank} exited with code {failure.exitcode} "
            f"({len(failures)} of {nproc} ranks failed; each rank's error is printed above)"
            f"{resume}"
        ) from None
