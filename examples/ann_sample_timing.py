"""Time one ann sampler call, the sequence-query fast path against the general path, alternating in
one process on the same batches (median of --steps): the sampler of `annsample train --catalog-size
N`, with the model of a finished run of that size (--run) or a fresh one, FAISS search included.
Also the preset's mixture (half the negatives from popularity) with either path.

    .venv/bin/python examples/ann_sample_timing.py --catalog-size 1M --run runs/cat/RUN --threads 1 \
        --json docs/ann_sample_timing_1m.json

(The mixture's figure at k = 128 is for completeness: the preset mixes only at k = 1, with BCE.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from annsample.api import sample_negatives
from annsample.bench.step import _batches, _trained_run
from annsample.config import catalog_overrides, load_config
from annsample.model import SASRec
from annsample.prepare import prepare_data
from annsample.refresh import make_index_refresher
from annsample.run import load_model
from annsample.samplers import AnnSampler, BlendSampler, PopularitySampler, build_sampler
from annsample.synthetic import parse_size


class GeneralPath(AnnSampler):
    """The ann sampler without its sequence fast path (what every call took before it)."""

    def _sample_sequences(self, *args, **kwargs):
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog-size", default="100k")
    parser.add_argument("--run", default=None, help="a train --catalog-size run folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12, help="batches timed (median)")
    parser.add_argument("--negatives", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--json", default=None, help="also write the result there")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_items = parse_size(args.catalog_size)
    config = load_config(None, catalog_overrides(n_items) + ("sampler.name=ann",))
    prepared = prepare_data(config)
    split = prepared.split
    model = SASRec(split.n_items, config.data.max_len, config.model)
    if args.run:
        trained = _trained_run(args.run, config, n_items)
        model.load_state_dict(load_model(*trained, split.n_items, torch.device("cpu")).state_dict())
    items = model.item_embeddings.detach()
    refresher = make_index_refresher(config, items.shape[1], split.n_items)
    refresher.build(items[1:].contiguous(), step=0, ids=torch.arange(1, split.n_items + 1))
    fast = build_sampler(config.sampler, prepared.popularity, refresher)
    s = config.sampler
    general = GeneralPath(
        fast.index, s.alpha, s.candidates, s.epsilon, s.query, s.tail_samples
    )  # fmt: skip
    popularity = PopularitySampler(prepared.popularity, beta=s.beta)
    variants = {
        "general": general,
        "fast": fast,
        "mixture_general": BlendSampler(popularity, general, 0.5),
        "mixture_fast": BlendSampler(popularity, fast, 0.5),
    }
    batches, lengths = _batches(prepared, config, args.steps + 1, torch.Generator().manual_seed(2))
    inputs = torch.as_tensor(prepared.train_inputs)
    targets = torch.as_tensor(prepared.train_targets)
    calls = []
    for batch in batches:
        width = int(lengths[batch].max())
        with torch.no_grad():
            hidden = model.encode(inputs[batch, -width:])
        calls.append((hidden, targets[batch, -width:], prepared.histories(batch, "cpu")))
    generator = torch.Generator().manual_seed(1)
    out: dict = {"catalog_size": n_items, "trained": bool(args.run), "threads": args.threads}
    for k in args.negatives:
        times: dict[str, list[float]] = {name: [] for name in variants}
        for hidden, positives, histories in calls:
            for name, sampler in variants.items():
                t0 = time.perf_counter()
                sample_negatives(sampler, hidden, positives, items, k, generator, histories)
                times[name].append(time.perf_counter() - t0)
        # the first batch warms up every path and is not counted
        out[f"k={k}"] = {
            name: round(1000 * float(np.median(t[1:])), 1) for name, t in times.items()
        }
    refresher.close()
    print(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
