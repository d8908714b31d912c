"""Exact GenNi by chunked Gumbel-max: the GPU baseline an index has to beat.

:class:`GumbelExactSampler` draws from p(j | h) ∝ exp(α · h·e_j) over every allowed item, like
:class:`annsample.samplers.ExactSampler`, in one streaming pass over item chunks that never holds a
(P × N) score matrix. Per chunk it computes the (P, C) logits with one matmul in the chosen
precision (fp32, tf32 or bf16), masks the exclusions, and

- adds independent Gumbel noise -log(E), E ~ Exp(1), per draw and item and keeps the running
  arg-max per draw (the Gumbel-max trick: arg-max_j (s_j + G_j) is distributed ∝ exp(s_j));
- folds the chunk's logsumexp into a running log-partition (float64),

so ``log_q`` = (winning logit) - (log-partition) is exact for the logits the draw used. Its work is
one matmul plus a few elementwise passes over each (P, C) block: with bf16 inputs the matmul runs
on tensor cores and the passes dominate. The random numbers scale with k (one per draw, item and
position), so it suits few negatives per position (BCE); for many, ExactSampler's per-chunk
reservoir draw needs fewer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from annsample.errors import SamplerError
from annsample.samplers import Exclusions, Negatives

PRECISIONS = ("fp32", "tf32", "bf16")
# Score blocks hold at most this many values unless chunk_elements says otherwise: 64 MiB of
# float32 on CPU, 1 GiB on CUDA, where fewer and larger kernels matter more than memory.
CPU_CHUNK_ELEMENTS = 1 << 24
CUDA_CHUNK_ELEMENTS = 1 << 28
_TINY = torch.finfo(torch.float32).tiny


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """Let CUDA float32 matmuls use TF32 inside the block for "tf32", forbid it otherwise.

    The flag is process-wide (torch has no per-call switch), so it is restored on exit.
    """
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class GumbelExactSampler:
    """Exact GenNi negatives by chunked Gumbel-max, with an exact streamed log-partition.

    Args:
        alpha: inverse temperature α.
        precision: "fp32" (the reference), "tf32" (CUDA TF32 matmul, float32 storage) or "bf16"
            (queries and item chunks cast to bfloat16 for the matmul). The draw and ``log_q`` are
            exact for the logits computed at that precision; rounding only perturbs the logits
            (about 2^-8 relative for bf16).
        chunk_elements: bound on each (P, C) score block and (P, k', C) noise block; default
            2**24 on CPU, 2**28 on CUDA.

    Example:
        >>> items = torch.randn(101, 8)  # row 0 is padding
        >>> queries = torch.randn(4, 8)
        >>> exclusions = Exclusions.from_positives(torch.tensor([1, 2, 3, 4]), n_items=100)
        >>> out = GumbelExactSampler().sample(
        ...     queries, items, exclusions, k=3, generator=torch.Generator().manual_seed(0))
        >>> tuple(out.ids.shape), bool((out.ids >= 1).all()), bool((out.log_q <= 0).all())
        ((4, 3), True, True)
    """

    name = "exact_gumbel"
    model_aware = True
    exact_log_q = True

    def __init__(
        self, alpha: float = 1.0, precision: str = "fp32", chunk_elements: int | None = None
    ) -> None:
        if precision not in PRECISIONS:
            raise SamplerError(
                f"unknown matmul precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
            )
        if chunk_elements is not None and chunk_elements < 1:
            raise SamplerError(f"chunk_elements={chunk_elements} must be positive")
        self.alpha = alpha
        self.precision = precision
        self.chunk_elements = chunk_elements

    def _budget(self, device: torch.device) -> int:
        if self.chunk_elements is not None:
            return self.chunk_elements
        return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS

    def sample(
        self,
        queries: torch.Tensor,
        item_embeddings: torch.Tensor,
        exclusions: Exclusions,
        k: int,
        generator: torch.Generator,
        sequence_queries: torch.Tensor | None = None,
    ) -> Negatives:
        """Draw k negatives per position ∝ exp(α·h·e_j) over its allowed items.

        Args:
            queries: (P, d) float hidden states.
            item_embeddings: (N+1, d) float item table, row 0 = padding (never drawn).
            exclusions: what each position may not draw.
            k: draws per position (with replacement).
            generator: the only source of randomness, on ``queries``' device.

        Returns:
            ids (P, k) int64 in 1..N and log_q (P, k) float32 = log p(id | h).
        """
        exclusions.check_nonempty()
        P = queries.shape[0]
        device = queries.device
        N = item_embeddings.shape[0] - 1
        budget = self._budget(device)
        chunk = max(1, min(N, budget // max(P, 1)))
        draws_per_block = max(1, min(k, budget // max(P * chunk, 1)))
        low = torch.bfloat16 if self.precision == "bf16" else torch.float32
        q = (self.alpha * queries.float()).to(low)  # α folded into the queries: one pass over P
        best = torch.full((P, k), float("-inf"), device=device)  # best perturbed logit per draw
        ids = torch.ones(P, k, dtype=torch.int64, device=device)
        logit = torch.full((P, k), float("-inf"), device=device)  # winning (unperturbed) logit
        log_z = torch.full((P,), float("-inf"), dtype=torch.float64, device=device)
        hist = exclusions.history[exclusions.row]  # (P, H)
        rows = torch.arange(P, device=device)
        with torch.no_grad(), matmul_precision(self.precision):
            for start in range(1, N + 1, chunk):
                end = min(start + chunk, N + 1)
                logits = (q @ item_embeddings[start:end].to(low).T).float()  # (P, C)
                inside = (hist >= start) & (hist < end)
                logits[rows[:, None].expand_as(hist)[inside], hist[inside] - start] = float("-inf")
                pos_inside = (exclusions.positives >= start) & (exclusions.positives < end)
                logits[rows[pos_inside], exclusions.positives[pos_inside] - start] = float("-inf")
                log_z = torch.logaddexp(log_z, torch.logsumexp(logits, dim=1).double())
                for d0 in range(0, k, draws_per_block):
                    d1 = min(d0 + draws_per_block, k)
                    # logits + Gumbel noise -log(E), E ~ Exp(1), built in place: (P, k', C).
                    # The clamp keeps a (rare) E == 0 from becoming +inf and winning outright.
                    noise = torch.empty(P, d1 - d0, end - start, device=device)
                    noise.exponential_(generator=generator).clamp_min_(_TINY).log_()
                    perturbed = torch.sub(logits[:, None, :], noise, out=noise)
                    value, col = perturbed.max(dim=2)  # (P, k')
                    better = value > best[:, d0:d1]
                    best[:, d0:d1] = torch.where(better, value, best[:, d0:d1])
                    ids[:, d0:d1] = torch.where(better, col + start, ids[:, d0:d1])
                    logit[:, d0:d1] = torch.where(better, logits.gather(1, col), logit[:, d0:d1])
        return Negatives(ids, (logit.double() - log_z[:, None]).float())

    def probabilities(self, queries, item_embeddings, exclusions) -> torch.Tensor:
        """(P, N+1) exact proposal probabilities at this sampler's precision (small catalogs).

        The logits come from the same product :meth:`sample` computes in one chunk (items 1..N),
        so on a GPU the same kernel rounds them the same way.
        """
        low = torch.bfloat16 if self.precision == "bf16" else torch.float32
        q = (self.alpha * queries.float()).to(low)
        with torch.no_grad(), matmul_precision(self.precision):
            logits = (q @ item_embeddings[1:].to(low).T).float()  # (P, N)
        logits = torch.cat([logits.new_full((logits.shape[0], 1), float("-inf")), logits], dim=1)
        logits = logits.masked_fill(exclusions.dense_mask(), float("-inf"))
        return torch.softmax(logits.double(), dim=1).float()
