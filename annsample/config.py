"""Run configuration: frozen dataclasses loaded from YAML, with typed ``--set`` overrides.

Unknown keys and wrong types are errors that name the file and the key, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from annsample.errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/Beauty.txt"  # relative paths resolve against the working directory
    format: str = "auto"  # "auto", "sequences" or "interactions"
    user_col: str = "user"
    item_col: str = "item"
    time_col: str = "timestamp"
    max_len: int = 50
    # synthetic catalog (used when path == "synthetic"): see annsample.synthetic
    synthetic_items: int = 0
    synthetic_users: int = 0  # 0 = synthetic_items, at least 1000
    synthetic_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 64
    num_blocks: int = 2
    num_heads: int = 1  # the recipe (docs/results.md, "A training recipe at the published level")
    dropout: float = 0.6  # the recipe
    init_std: float = 0.02
    sparse_embeddings: bool = (
        False  # sparse item-embedding gradients (use with SparseAdam at 1M items)
    )
    layer_norm: str = "post"  # "post" (LayerNorm after each residual) or "pre" (+ a final one)
    # "s3rec" (the S3-Rec / ICLRec reference code) or "sasrec" (Kang & McAuley's original block;
    # see annsample.model)
    architecture: str = "s3rec"


@dataclass(frozen=True)
class IndexConfig:
    backend: str = "auto"  # "auto", "faiss", "faiss-gpu", "exact", "torch_ivf"
    metric: str = "l2_augmented"  # "ip", "l2_augmented", "cosine" (docs/benchmarks.md: recall)
    nlist: int = 0  # IVF lists; 0 = annsample.index.default_nlist(N): sqrt(N), at most N // 39
    nprobe: int = 0  # lists probed per query; 0 = annsample.index.default_nprobe(nlist): nlist / 8
    refresh: str = "steps"  # "steps", "epoch", "never", "adaptive"
    refresh_every: int = 10  # steps between refreshes for refresh == "steps"
    retrain_every: int = 10  # every M-th refresh re-runs k-means, warm-started (0 = never)
    # steps schedule: a refresh is a retrain when the index recall@k measured just before it is
    # below this (0 = never; the probe then also runs at every refresh step)
    retrain_below: float = 0.0
    asynchronous: bool = False
    drift_threshold: float = 0.05  # adaptive schedule
    recall_threshold: float = 0.0  # adaptive schedule (0 = not used)
    check_every: int = 50  # adaptive schedule: steps between staleness checks
    probe_every: int = 100  # measure staleness every n steps (0 = just before every refresh)
    probe_queries: int = 64  # validation users whose hidden states probe the index


@dataclass(frozen=True)
class SamplerConfig:
    # uniform, popularity, exact, exact_gumbel, pool, dns, ann, in_batch, mixed, tron
    name: str = "uniform"
    num_negatives: int = 1  # k negatives per position (tron: the k kept of its candidates)
    exclude_history: bool = (
        True  # also exclude the user's training history (the positive always is)
    )
    alpha: float = 1.0  # GenNi inverse temperature
    beta: float = 1.0  # popularity exponent: q ∝ count^beta
    pool_size: int = 1000  # pool / dns candidates M
    candidates: int = 200  # ann: K candidates from the index
    epsilon: float = 0.01  # ann: uniform mixture mass, added to the candidates' and tail's draw
    tail_samples: int = (
        256  # ann: uniform items that estimate the GenNi mass outside the candidates
    )
    query: str = (
        "position"  # ann: "position" (every position queries) or "sequence" (last state queries)
    )
    matmul_precision: str = "fp32"  # exact_gumbel: "fp32", "tf32" or "bf16" score matmuls
    warmup_steps: int = 0  # warm-up negatives for the first steps (not uniform, in_batch, mixed)
    warmup_sampler: str = "uniform"  # what serves the warm-up steps: "uniform" or "popularity"
    # then a gradual hand-over: over these steps the warm-up sampler's share of the negatives falls
    # linearly from 1 to warmup_share (0 = switch at once)
    warmup_blend_steps: int = 0
    # the share of the negatives the warm-up sampler keeps for the rest of training, one coin per
    # negative (0 = none: the named sampler serves alone after the hand-over)
    warmup_share: float = 0.0
    # mixed: how many of the num_negatives come from the batch's positives (the rest uniform);
    # tron: in-batch candidates per position (TRON's 127)
    in_batch_negatives: int = 127
    uniform_candidates: int = 16384  # tron: uniform candidates shared by the batch (TRON's 16,384)
    index: IndexConfig = field(default_factory=IndexConfig)


@dataclass(frozen=True)
class LossConfig:
    name: str = "bce"  # bce, sampled_softmax, gbce, scaled_ce, full_ce
    gbce_t: float = 0.75  # gSASRec calibration parameter t
    logq_correction: bool = True  # sampled_softmax only
    # sampled_softmax with logq_correction: Khrylchenko et al.'s corrected logQ (losses module)
    corrected_logq: bool = False
    sce_scale: float = 100.0  # scaled_ce: α, the scale of the negatives' sum (Xu et al. 2024)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = (
        512  # the recipe (docs/results.md, "A training recipe at the published level")
    )
    lr: float = 5e-4  # the recipe
    # learning rate of the item-embedding table (0 = train.lr); at 1M items 3e-3 and 1e-2 tested
    # worse than the preset's 1e-3 (docs/results.md, "Less dropout for large catalogs")
    embedding_lr: float = 0.0
    weight_decay: float = 0.0
    eval_every: int = 5  # epochs between validation evaluations
    patience: int = 6  # evaluations without validation NDCG@10 improvement before stopping
    eval_batch_size: int = 1024
    eval_users: int = 0  # evaluate a fixed random subset of users (0 = all; for huge catalogs)
    device: str = "cpu"  # "cpu", "cuda", "auto"
    num_threads: int = 0  # torch threads (0 = torch default)
    log_every: int = 50  # steps between train/ JSONL records
    # batch sequences of similar length (see train.make_batches): faster epochs, but the recipe
    # measured worse models with it on Beauty (docs/results.md), so it is off by default
    bucket_by_length: bool = False
    max_steps_per_epoch: int = 0  # 0 = full epochs (a cap makes smoke runs cheap)
    show_progress: bool = True
    checkpoint_every: int = 500  # steps between full-state checkpoints (0 = at epoch ends only)
    keep_checkpoints: int = 3  # newest checkpoints kept in <run>/checkpoints
    valid_users: int = 0  # users validated during training (0 = as eval_users)
    max_seconds: float = 0.0  # training-loop wall-clock budget, validations included (0 = none)
    lr_warmup_steps: int = 0  # linear learning-rate warm-up over the first steps (0 = none)
    # "constant", or "cosine" / "linear" decay to 0 over epochs x steps per epoch (see train.py)
    lr_schedule: str = "constant"


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# The one registry of names: samplers.make_sampler builds each sampler, api and the CLI list them.
SAMPLER_NAMES = (
    "uniform", "popularity", "exact", "exact_gumbel", "pool", "dns", "ann", "in_batch", "mixed",
    "tron",
)  # fmt: skip
# samplers whose negatives come from the batch's positives (a probe of held-out users has none)
BATCH_SAMPLER_NAMES = ("in_batch", "mixed", "tron")
# losses over sampled negatives
SAMPLED_LOSS_NAMES = ("bce", "sampled_softmax", "gbce", "scaled_ce")
LOSS_NAMES = (*SAMPLED_LOSS_NAMES, "full_ce")
INDEX_BACKENDS = ("auto", "faiss", "faiss-gpu", "exact", "torch_ivf")
INDEX_METRICS = ("ip", "l2_augmented", "cosine")

CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("auto", "sequences", "interactions"),
    "model.layer_norm": ("post", "pre"),
    "model.architecture": ("s3rec", "sasrec"),
    "sampler.name": SAMPLER_NAMES,
    "sampler.matmul_precision": ("fp32", "tf32", "bf16"),
    "sampler.query": ("position", "sequence"),
    "sampler.warmup_sampler": ("uniform", "popularity"),
    "sampler.index.backend": INDEX_BACKENDS,
    "sampler.index.metric": INDEX_METRICS,
    "sampler.index.refresh": ("steps", "epoch", "never", "adaptive"),
    "loss.name": LOSS_NAMES,
    "train.device": ("cpu", "cuda", "auto"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
}
POSITIVE = {
    "data.max_len",
    "model.hidden_size",
    "model.num_blocks",
    "model.num_heads",
    "sampler.num_negatives",
    "sampler.pool_size",
    "sampler.candidates",
    "sampler.index.refresh_every",
    "sampler.index.check_every",
    "sampler.index.probe_queries",
    "train.epochs",
    "train.batch_size",
    "train.eval_every",
    "train.patience",
    "train.eval_batch_size",
    "train.log_every",
    "train.keep_checkpoints",
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float, as YAML 1.2 does (YAML 1.1 needs ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotated type; ints are accepted for floats."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: is_number,
        str: isinstance(value, str),
    }.get(tp, False)
    if isinstance(value, dict):
        keys = ", ".join(map(str, value))
        raise ConfigError(f"{where}: is a {_type_name(tp)}, not a section (got keys: {keys})")
    if not ok:
        raise ConfigError(
            f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return float(value) if tp is float else value


@dataclass(frozen=True)
class _Override:
    """A ``--set`` value with its text, so a string key keeps "1e5" as typed."""

    value: Any
    text: str


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: section '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {type(raw).__name__}"
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known, key=str)
    if unknown:
        keys = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(
            f"{where}: unknown key(s) {keys}; valid keys here are: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        key = f"{prefix}{name}"
        if isinstance(value, _Override):
            value = value.text if tp is str else value.value
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, where, key + ".")
            continue
        value = _coerce(value, tp, f"{where}: key '{key}'")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(
                f"{where}: key '{key}' is {value!r}; choose one of {', '.join(CHOICES[key])}"
            )
        if key in POSITIVE and value < 1:
            raise ConfigError(f"{where}: key '{key}' must be >= 1, got {value}")
        kwargs[name] = value
    return cls(**kwargs)


def _check_consistency(config: RunConfig, where: str) -> None:
    if config.model.hidden_size % config.model.num_heads:
        raise ConfigError(
            f"{where}: model.hidden_size ({config.model.hidden_size}) must be divisible by "
            f"model.num_heads ({config.model.num_heads})"
        )
    if not 0.0 <= config.model.dropout < 1.0:
        raise ConfigError(f"{where}: model.dropout must be in [0, 1), got {config.model.dropout}")
    if not 0.0 <= config.sampler.epsilon <= 1.0:
        raise ConfigError(
            f"{where}: sampler.epsilon must be in [0, 1], got {config.sampler.epsilon}"
        )
    if config.model.sparse_embeddings and config.loss.name == "full_ce":
        raise ConfigError(
            f"{where}: loss.name=full_ce uses the whole item table every step, so it cannot train "
            "sparse embeddings; set model.sparse_embeddings=false or use a sampled loss"
        )
    if config.train.checkpoint_every < 0:
        raise ConfigError(
            f"{where}: train.checkpoint_every must be >= 0 (0 = checkpoint at epoch ends only), "
            f"got {config.train.checkpoint_every}"
        )
    if not 0.0 <= config.train.max_seconds < math.inf:
        raise ConfigError(
            f"{where}: train.max_seconds must be a finite number >= 0 (0 = no budget), "
            f"got {config.train.max_seconds}"
        )
    if not math.isfinite(config.train.lr) or config.train.lr <= 0:
        raise ConfigError(f"{where}: train.lr must be a finite number > 0, got {config.train.lr}")
    for key in ("warmup_steps", "warmup_blend_steps"):
        if getattr(config.sampler, key) < 0:
            raise ConfigError(
                f"{where}: sampler.{key} must be >= 0 (0 = none), got {getattr(config.sampler, key)}"
            )
    if not 0.0 <= config.sampler.warmup_share < 1.0:
        raise ConfigError(
            f"{where}: sampler.warmup_share must be in [0, 1) (0 = none; at 1 the named sampler "
            f"would serve nothing: set sampler.name to the warm-up sampler instead), "
            f"got {config.sampler.warmup_share}"
        )
    if not math.isfinite(config.train.embedding_lr) or config.train.embedding_lr < 0:
        raise ConfigError(
            f"{where}: train.embedding_lr must be a finite number >= 0 (0 = train.lr), "
            f"got {config.train.embedding_lr}"
        )
    if config.train.lr_warmup_steps < 0:
        raise ConfigError(
            f"{where}: train.lr_warmup_steps must be >= 0 (0 = no warm-up), "
            f"got {config.train.lr_warmup_steps}"
        )
    if not math.isfinite(config.loss.sce_scale) or config.loss.sce_scale <= 0:
        raise ConfigError(
            f"{where}: loss.sce_scale must be a finite number > 0 (the paper's is 100), "
            f"got {config.loss.sce_scale}"
        )
    _check_batch_sampler(config.sampler, where)
    for key in ("nlist", "nprobe"):
        if getattr(config.sampler.index, key) < 0:
            raise ConfigError(
                f"{where}: sampler.index.{key} must be >= 0 (0 = follow the catalog size), "
                f"got {getattr(config.sampler.index, key)}"
            )
    if config.sampler.index.nlist and config.sampler.index.nprobe > config.sampler.index.nlist:
        raise ConfigError(
            f"{where}: sampler.index.nprobe ({config.sampler.index.nprobe}) must be <= "
            f"sampler.index.nlist ({config.sampler.index.nlist})"
        )


def _check_batch_sampler(s: SamplerConfig, where: str) -> None:
    """The candidate counts of the in-batch samplers: non-negative, and enough of them."""
    for key in ("in_batch_negatives", "uniform_candidates"):
        if getattr(s, key) < 0:
            raise ConfigError(f"{where}: sampler.{key} must be >= 0, got {getattr(s, key)}")
    if s.name == "mixed" and not 1 <= s.in_batch_negatives < s.num_negatives:
        raise ConfigError(
            f"{where}: sampler.name=mixed draws sampler.in_batch_negatives of its "
            f"sampler.num_negatives negatives from the batch and the rest uniformly, so it needs "
            f"1 <= in_batch_negatives < num_negatives; got {s.in_batch_negatives} of "
            f"{s.num_negatives} (use sampler.name=in_batch for in-batch negatives only)"
        )
    if s.name == "tron" and s.in_batch_negatives + s.uniform_candidates < s.num_negatives:
        raise ConfigError(
            f"{where}: sampler.name=tron keeps the sampler.num_negatives={s.num_negatives} "
            f"best of sampler.in_batch_negatives + sampler.uniform_candidates = "
            f"{s.in_batch_negatives} + {s.uniform_candidates} candidates; raise the candidates "
            "or lower num_negatives"
        )


# Sampler keys and the samplers that read them (keys not listed are read by every sampler).
_SAMPLER_KEY_USERS: dict[str, tuple[str, ...]] = {
    "alpha": ("exact", "exact_gumbel", "pool", "ann"),
    "beta": ("popularity",),
    "pool_size": ("pool", "dns"),
    "candidates": ("ann",),
    "epsilon": ("ann",),
    "tail_samples": ("ann",),
    "query": ("ann",),
    "matmul_precision": ("exact_gumbel",),
    # not uniform, in_batch or mixed: a draw that ignores the model has nothing to warm up for
    "warmup_steps": ("popularity", "exact", "exact_gumbel", "pool", "dns", "ann", "tron"),
    "warmup_sampler": ("popularity", "exact", "exact_gumbel", "pool", "dns", "ann", "tron"),
    "warmup_blend_steps": ("popularity", "exact", "exact_gumbel", "pool", "dns", "ann", "tron"),
    "warmup_share": ("popularity", "exact", "exact_gumbel", "pool", "dns", "ann", "tron"),
    "in_batch_negatives": ("mixed", "tron"),
    "uniform_candidates": ("tron",),
}
# sampler.index keys and the refresh schedules that read them (not listed: every schedule).
_REFRESH_KEY_USERS: dict[str, tuple[str, ...]] = {
    "refresh_every": ("steps",),
    "retrain_every": ("steps", "epoch", "adaptive"),
    "retrain_below": ("steps",),
    "asynchronous": ("steps", "epoch", "adaptive"),
    "drift_threshold": ("adaptive",),
    "recall_threshold": ("adaptive",),
    "check_every": ("adaptive",),
}
# Samplers whose log q is not the proposal probability a logQ correction needs.
_NOT_FOR_SAMPLED_SOFTMAX = {
    "dns": "dns keeps the best of its candidates and reports log q = 0, so the correction "
    "subtracts only log k",
    "pool": "pool's log q is conditional on the one pool shared by the batch, not the probability "
    "of drawing the item",
}
# Samplers that may feed a sampled softmax only without the logQ correction (their loss as
# published), with the reason the correction cannot apply.
_NO_LOGQ = {
    "tron": "tron keeps the top sampler.num_negatives of its candidates by current score, and a "
    "top-k selection has no tractable proposal probability to correct for (TRON, Wilm et al. "
    "2023, trains its sampled softmax without one)",
}
# loss keys and the losses that read them
_LOSS_KEY_USERS: dict[str, tuple[str, ...]] = {
    "logq_correction": ("sampled_softmax",),
    "corrected_logq": ("sampled_softmax",),
    "gbce_t": ("gbce",),
    "sce_scale": ("scaled_ce",),
}


def _non_default(section: Any, default: Any, prefix: str) -> list[str]:
    """Dotted keys of ``section`` (a config dataclass) whose value differs from ``default``'s."""
    return [
        f"{prefix}{f.name}"
        for f in dataclasses.fields(section)
        if getattr(section, f.name) != getattr(default, f.name)
    ]


def check_ignored_settings(
    config: RunConfig, where: str = "<config>", reference: RunConfig | None = None
) -> None:
    """Refuse settings the chosen sampler or loss ignores (set to a value other than
    ``reference``'s, by default the built-in defaults), and sampler / loss combinations whose
    maths is wrong.

    A saved run's resolved config lists every key, so it is loaded without this check.
    ``reference`` lets presets (``--catalog-size``) set keys the user may then make unused.
    """
    reference = reference or RunConfig()
    s, loss = config.sampler, config.loss
    if config.model.architecture == "sasrec":
        for key in ("layer_norm", "init_std"):
            if getattr(config.model, key) != getattr(reference.model, key):
                raise ConfigError(
                    f"{where}: model.{key} is set but model.architecture=sasrec ignores it (its "
                    "block places its own LayerNorms and uses Xavier initialisation); remove it "
                    "or use model.architecture=s3rec"
                )
    if loss.name == "full_ce":
        changed = _non_default(s, reference.sampler, "sampler.")
        if changed:
            raise ConfigError(
                f"{where}: {changed[0]} is set but loss.name=full_ce scores every item and "
                "ignores the sampler; remove the sampler settings or use a sampled loss"
            )
    else:
        warms_up = bool(s.warmup_steps or s.warmup_blend_steps or s.warmup_share)
        if s.warmup_sampler != reference.sampler.warmup_sampler and not warms_up:
            raise ConfigError(
                f"{where}: sampler.warmup_sampler is set but sampler.warmup_steps=0, so no step "
                "uses it; set sampler.warmup_steps (or sampler.warmup_share) or remove it"
            )
        blends = [key for key in ("warmup_blend_steps", "warmup_share") if getattr(s, key)]
        if blends and loss.name == "sampled_softmax" and loss.logq_correction:
            raise ConfigError(
                f"{where}: sampler.{blends[0]} with a logQ-corrected sampled_softmax: "
                "in a blend each negative carries the log q of the sampler that drew "
                "it, not of the blend, so the correction would be biased; use loss.name=bce or "
                f"gbce, loss.logq_correction=false, or sampler.{blends[0]}=0"
            )
        for key, users in _SAMPLER_KEY_USERS.items():
            if key == "beta" and s.warmup_sampler == "popularity" and warms_up:
                continue  # the popularity warm-up reads it
            if s.name not in users and getattr(s, key) != getattr(reference.sampler, key):
                raise ConfigError(
                    f"{where}: sampler.{key} is set but sampler.name={s.name} ignores it (it is "
                    f"read by {', '.join(users)}); remove it or choose one of those samplers"
                )
        if s.name != "ann":
            changed = _non_default(s.index, reference.sampler.index, "sampler.index.")
            if changed:
                raise ConfigError(
                    f"{where}: {changed[0]} is set but sampler.name={s.name} ignores the index "
                    "(only sampler.name=ann uses sampler.index); remove it or use the ann sampler"
                )
        else:
            for key, users in _REFRESH_KEY_USERS.items():
                if s.index.refresh not in users and getattr(s.index, key) != getattr(
                    reference.sampler.index, key
                ):
                    raise ConfigError(
                        f"{where}: sampler.index.{key} is set but sampler.index.refresh="
                        f"{s.index.refresh} ignores it (it is read by refresh="
                        f"{' / '.join(users)}); remove it or change the schedule"
                    )
    if loss.name == "sampled_softmax" and s.name in _NOT_FOR_SAMPLED_SOFTMAX:
        raise ConfigError(
            f"{where}: loss.name=sampled_softmax with sampler.name={s.name} is wrong: "
            f"{_NOT_FOR_SAMPLED_SOFTMAX[s.name]}. Use sampler.name=ann or exact (log q exact), "
            "uniform, popularity or mixed, or keep this sampler with loss.name=bce"
        )
    if loss.name == "sampled_softmax" and loss.logq_correction and s.name in _NO_LOGQ:
        raise ConfigError(
            f"{where}: loss.logq_correction=true (the default) with sampler.name={s.name} is "
            f"wrong: {_NO_LOGQ[s.name]}. Set loss.logq_correction=false"
        )
    for key, users in _LOSS_KEY_USERS.items():
        if loss.name not in users and getattr(loss, key) != getattr(reference.loss, key):
            raise ConfigError(
                f"{where}: loss.{key} is set but loss.name={loss.name} ignores it (only "
                f"loss.name={users[0]} reads it); remove it or change the loss"
            )
    if loss.corrected_logq and not loss.logq_correction:
        raise ConfigError(
            f"{where}: loss.corrected_logq is set but loss.logq_correction=false turns the logQ "
            "correction off, so there is nothing to correct; set loss.logq_correction=true or "
            "remove loss.corrected_logq"
        )


def catalog_overrides(n_items: int) -> tuple[str, ...]:
    """Overrides for ``annsample train --catalog-size N``: a synthetic catalog of N items.

    Large catalogs get the product's settings: the ANN sampler, mixed half and half with
    popularity-weighted negatives (``sampler.warmup_share``), over an IVF index with the default
    sqrt(N) lists (``annsample.index.default_nlist``) of which 16 are probed, one index query per
    sequence (its candidates serve all its positions), dropout 0.1 (0.5 below 100k items), sparse
    item-embedding gradients (a dense Adam step on a 1M-row table costs more than the rest of the
    step), inputs of the last 20 items (the synthetic catalog's dynamics are first order), and a
    15-minute budget: 10 minutes of training (``train.max_seconds``, validation on a fixed subset of
    500 users every 250 steps included), the rest for generating the catalog, building the index
    and the final evaluation on 1,000 users (about two minutes each at 1M items on 2 shared cores).
    """
    overrides = [
        "name=synthetic-"
        + (f"{n_items // 1_000_000}M" if n_items % 1_000_000 == 0 else str(n_items)),
        "data.path=synthetic",
        f"data.synthetic_items={n_items}",
        # the settings these presets were measured with under their time budget (docs/results.md,
        # issue 12); the dataset recipe (lr 5e-4, dropout 0.6, ...) is tuned for convergence
        "model.num_heads=2",
        # a 1M catalog's 600 s sees each training sequence at most once, so dropout only slows
        # learning there: 0.1 tested +37% test NDCG@10 over 0.5 at 1M and tied it at 100k in
        # 40% of the time (docs/results.md, "Less dropout for large catalogs"); smaller catalogs
        # keep the 0.5 they were measured with
        f"model.dropout={0.1 if n_items >= 100_000 else 0.5}",
        "train.batch_size=256",
        "train.lr=0.001",
        "train.bucket_by_length=true",
        "train.eval_every=1",
    ]
    if n_items >= 100_000:
        overrides += [
            "sampler.name=ann",
            # half of every step's negatives popularity-weighted, half GenNi from the index:
            # at 100k and 1M this tested 1.8x / 6.5x the pure ann sampler (docs/results.md;
            # popularity alone still leads at 1M within the budget)
            "sampler.warmup_sampler=popularity",
            "sampler.warmup_share=0.5",  # dropped when --set names another sampler
            "sampler.query=sequence",
            "sampler.index.nprobe=16",  # default_nprobe (nlist / 8) costs too much per step here
            "sampler.index.refresh_every=100",  # a 1M re-add takes ~1 s: every 10 steps is too often
            # retrain while the probed recall is below 0.5 (the step-0 centroids cap it at ~0.25)
            "sampler.index.retrain_below=0.5",
            "model.sparse_embeddings=true",
            "data.max_len=20",
            "train.eval_users=1000",
            "train.valid_users=500",
            "train.max_seconds=600",
            "train.max_steps_per_epoch=250",
            "train.epochs=1000",
            "train.patience=4",
            "train.checkpoint_every=0",
        ]
    return tuple(overrides)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"train.lr=1e-3"`` into (["train", "lr"], 0.001); the value is read as YAML.

    >>> parse_override("sampler.index.nprobe=32")
    (['sampler', 'index', 'nprobe'], 32)
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
    key, _, value_text = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key is empty; use dotted keys like train.epochs")
    try:
        value = _yaml_load(value_text) if value_text.strip() else ""
    except (yaml.YAMLError, RecursionError) as error:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({error})") from None
    return key.split("."), value


def _apply_override(raw: dict, path: list[str], value: Any, text: str) -> None:
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {text!r}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def config_from_dict(
    raw: Any,
    where: str = "<config>",
    overrides: tuple[str, ...] = (),
    check_ignored: bool = True,
    preset: tuple[str, ...] = (),
) -> RunConfig:
    """Build a :class:`RunConfig` from a parsed mapping plus ``KEY=VALUE`` overrides.

    ``check_ignored`` refuses settings the chosen sampler or loss ignores
    (:func:`check_ignored_settings`); a saved run's resolved config is loaded without it.
    ``preset`` overrides (e.g. :func:`catalog_overrides`) apply before ``overrides`` and count as
    defaults for that check, so ``--catalog-size 1M --set sampler.name=uniform`` is not an error
    about the preset's ann settings. An override that names another sampler than the preset's
    also drops the preset's :data:`PRESET_SAMPLER_TIED` settings: a uniform baseline on the 1M
    preset draws uniform negatives, not the preset's popularity mixture.
    """
    preset = _preset_for_sampler(tuple(preset), overrides)
    overrides = tuple(preset) + tuple(overrides)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    try:
        raw = _deep_copy(raw)
    except RecursionError:
        raise ConfigError(
            f"{where}: the config refers to itself (a recursive YAML alias)"
        ) from None
    for text in overrides:
        path, value = parse_override(text)
        _apply_override(raw, path, _Override(value, text.partition("=")[2].strip()), text)
    where_all = where + (" (with --set overrides)" if overrides else "")
    config = _build(RunConfig, raw, where_all, "")
    _check_consistency(config, where_all)
    if check_ignored:
        reference = config_from_dict({}, overrides=preset, check_ignored=False) if preset else None
        check_ignored_settings(config, where_all, reference)
    return config


# preset settings that belong to the preset's sampler (the ann + popularity mixture of
# catalog_overrides): a run that names another sampler does not inherit them
PRESET_SAMPLER_TIED = ("sampler.warmup_sampler", "sampler.warmup_share")


def _preset_for_sampler(preset: tuple[str, ...], overrides: tuple[str, ...]) -> tuple:
    """``preset`` without its :data:`PRESET_SAMPLER_TIED` settings when ``overrides`` name a
    sampler other than the preset's (a config file's sampler does not: the preset overrides it)."""

    def key(text: str) -> str:
        return text.partition("=")[0].strip()

    def named(texts: tuple[str, ...]) -> Any:
        names = [parse_override(text)[1] for text in texts if key(text) == "sampler.name"]
        return names[-1] if names else None

    chosen = named(overrides)
    if chosen is None or chosen == named(preset):
        return preset
    return tuple(text for text in preset if key(text) not in PRESET_SAMPLER_TIED)


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def load_config(
    path: str | Path | None,
    overrides: tuple[str, ...] = (),
    check_ignored: bool = True,
    preset: tuple[str, ...] = (),
) -> RunConfig:
    """Load a YAML run config (``None`` = all defaults) and apply ``--set`` overrides.

    ``check_ignored=False`` skips :func:`check_ignored_settings`: for a run folder's saved
    ``config.yaml``, which lists every key (older runs with older defaults).
    """
    if path is None:
        return config_from_dict({}, "<defaults>", overrides, check_ignored, preset)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass an existing YAML file, e.g. configs/beauty.yaml"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; a config is YAML text") from None
    try:
        raw = _yaml_load(text)
    except (yaml.YAMLError, RecursionError) as error:
        raise ConfigError(f"{path}: invalid YAML: {error}".replace("\n", " ")) from None
    return config_from_dict(raw, str(path), overrides, check_ignored, preset)


def config_to_dict(config: Any) -> dict:
    """A plain nested dict of the config (a new object; the config itself is never touched)."""
    return dataclasses.asdict(config)


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")
