"""The one config schema.

`TitanConfig` describes the model and `model.memory` its long-term memory (one dataclass per memory kind); the other
dataclasses describe a training run. Hydra composes YAML files from `conf/` on top of these dataclasses
(registered in its ConfigStore by `ltm_core.configuration`), so a wrong type or an unknown key is caught by
OmegaConf, and `validate()` checks the values. This module imports neither torch nor Lightning, so a config can be
checked before they load.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from ltm_core.errors import ConfigError, DataError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
KERNELS = ("auto", "triton", "torch")


def _positive_int(key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(key, f"must be a positive integer, got {value!r}")


def _non_negative(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(key, f"must be a number >= 0, got {value!r}")


# ------------------------------------------------------------------------------------------- memory kinds
@dataclass
class TokensMemoryConfig:
    """`model/memory=tokens` (the default): the memory keeps the `slots` most important whole tokens seen so far, as
    the self-attention sees them (its normed input), and the self-attention reads them through its own key/value
    projections beside the segment: a KV cache of the important tokens (ltm_core/memory/tokens.py)."""

    kind: str = "tokens"
    slots: int = 64  # M: tokens kept per layer
    select_noise: float = 0.5  # training only: Gumbel noise on the ranking (times the candidates' importance
    # spread), so tokens the ranking would drop are sometimes kept and the ranking learns from them; 0: exact
    importance_penalty: float = 1.0  # training only: adds this times the mean importance sigmoid(w . token) of each
    # written segment to the loss, so tokens no read needs sink in the ranking (logged as train/aux_loss); 0: off
    importance_detach: bool = True  # the penalty trains the importance weights w only, not the tokens below them
    select_dedup: Optional[float] = None  # a candidate within this cosine of a higher-ranked one ranks after every
    # distinct one (near-duplicate suppression): a repeating text cannot fill the memory with copies; null: off
    read_importance: bool = True  # the read adds log sigmoid(importance) of each kept token to its attention scores

    def validate(self, model: "TitanConfig") -> None:
        _positive_int("model.memory.slots", self.slots)
        for key in ("select_noise", "importance_penalty"):
            _non_negative(f"model.memory.{key}", getattr(self, key))
        if self.select_dedup is not None and (isinstance(self.select_dedup, bool)
                                              or not isinstance(self.select_dedup, (int, float))
                                              or not 0 < self.select_dedup <= 1):
            raise ConfigError("model.memory.select_dedup",
                              f"must be a cosine in (0, 1] or null, got {self.select_dedup!r}")

    def width(self, model: "TitanConfig") -> int:
        return model.hidden_size  # an entry is a token


@dataclass
class SlotsMemoryConfig:
    """`model/memory=slots`: the seed design. Each segment's block outputs are compressed and gated
    (c = W_c h, g = c * sigmoid(w . c)); `slots` learned slots read them by attention and an update gate mixes the
    result in; the tokens read the slots by a cross-attention sub-layer (ltm_core/memory/slots.py)."""

    kind: str = "slots"
    slots: int = 32  # M: slots per layer
    dim: int = 64  # D: width of a slot
    heads: Optional[int] = None  # heads of the cross-attention read; null: model.num_attention_heads
    update_gate_bias: float = -2.0  # initial b_u: sigmoid(-2) ~ 0.12, a memory that starts by mostly keeping

    def validate(self, model: "TitanConfig") -> None:
        _positive_int("model.memory.slots", self.slots)
        _positive_int("model.memory.dim", self.dim)
        heads = self.heads or model.num_attention_heads
        if not isinstance(heads, int) or heads <= 0 or model.hidden_size % heads:
            raise ConfigError("model.memory.heads", f"{heads} must divide model.hidden_size={model.hidden_size}")

    def width(self, model: "TitanConfig") -> int:
        return self.dim


@dataclass
class DeltaMemoryConfig:
    """`model/memory=delta`: an associative memory. Per layer a linear map from `dim`-wide keys to `slots`-wide values,
    written token by token with the delta rule (a key written again replaces its value) from the state after
    self-attention, and read as map @ normalize(query) (ltm_core/memory/delta.py)."""

    kind: str = "delta"
    slots: int = 32  # M: width of the values (rows of the map)
    dim: int = 64  # D: width of the keys (columns of the map)

    def validate(self, model: "TitanConfig") -> None:
        _positive_int("model.memory.slots", self.slots)
        _positive_int("model.memory.dim", self.dim)

    def width(self, model: "TitanConfig") -> int:
        return self.dim


NEURAL_PLACEMENTS = ("mac", "mag", "mal")


@dataclass
class NeuralMemoryConfig:
    """`model/memory=neural`: the Titans neural memory. Per layer a small MLP whose weights are the state, written by
    gradient steps on ||M(k) - v||^2 with data-dependent step, momentum and decay (computed chunk-parallel), read
    by M(q); `placement` is the paper's mac | mag | mal (ltm_core/memory/neural.py)."""

    kind: str = "neural"
    placement: str = "mag"  # mac: retrieved tokens prefix the attention, the memory is written with its output
    # (retrieve -> attend -> update; segment by segment) | mag: a gated residual after the attention | mal: a
    # residual layer before the attention (mag, mal: written from the block's normed input; layer by layer)
    slots: int = 64  # H: hidden width of the memory MLP (depth 2)
    dim: int = 32  # D: width of the keys, values and queries (the MLP maps D -> D)
    depth: int = 2  # 2: M(k) = W2 silu(W1 k) / sqrt(H); 1: a linear map M(k) = W k (Titans' linear memory)
    chunk: int = 16  # tokens whose gradients are taken at the same weights (the paper's §3.2 chunk); 1: token by
    # token; a segment's last chunk may be shorter
    lr: float = 0.3  # the largest step: theta_t = lr * sigmoid(w . x_t)
    momentum_bias: float = -2.0  # initial bias of the momentum eta: sigmoid(-2) ~ 0.12
    decay_bias: float = -6.0  # initial bias of the forgetting alpha: sigmoid(-6) ~ 0.0025 per token
    retrieved: int = 16  # mac: memory tokens retrieved per segment (by learned queries)
    persistent: int = 0  # learned persistent tokens every segment's attention also reads (any placement)
    normalize_values: bool = True  # l2-normalised values, as the keys (false: the paper's free values, which
    # diverged in the babi_facts recipe; checkpoints stored without this key were trained with false)

    def validate(self, model: "TitanConfig") -> None:
        if not isinstance(self.normalize_values, bool):
            raise ConfigError("model.memory.normalize_values", f"must be true or false, got {self.normalize_values!r}")
        if self.placement not in NEURAL_PLACEMENTS:
            raise ConfigError("model.memory.placement",
                              f"must be one of {', '.join(NEURAL_PLACEMENTS)}, got {self.placement!r}")
        for key in ("slots", "dim", "chunk", "retrieved"):
            _positive_int(f"model.memory.{key}", getattr(self, key))
        if self.depth not in (1, 2) or isinstance(self.depth, bool):
            raise ConfigError("model.memory.depth", f"must be 1 (a linear map) or 2 (an MLP), got {self.depth!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ConfigError("model.memory.lr", f"must be a number > 0, got {self.lr!r}")
        if not isinstance(self.persistent, int) or isinstance(self.persistent, bool) or self.persistent < 0:
            raise ConfigError("model.memory.persistent", f"must be an integer >= 0, got {self.persistent!r}")

    def width(self, model: "TitanConfig") -> int:
        return self.dim


MemoryConfig = Union[TokensMemoryConfig, SlotsMemoryConfig, DeltaMemoryConfig, NeuralMemoryConfig]
MEMORY_CONFIGS: dict[str, type] = {"tokens": TokensMemoryConfig, "slots": SlotsMemoryConfig,
                                   "delta": DeltaMemoryConfig, "neural": NeuralMemoryConfig}


def memory_config(values: Any) -> MemoryConfig:
    """A memory config from a dict (or a memory config); its `kind` picks the dataclass, and a key the kind does not
    have is an error naming it."""
    if isinstance(values, tuple(MEMORY_CONFIGS.values())):
        return values
    if not isinstance(values, dict):
        raise ConfigError("model.memory", f"must be a memory config (kind: {', '.join(MEMORY_CONFIGS)}), got {values!r}")
    kind = values.get("kind", "tokens")
    if kind not in MEMORY_CONFIGS:
        raise ConfigError("model.memory.kind", f"must be one of {', '.join(MEMORY_CONFIGS)}, got {kind!r}")
    cls = MEMORY_CONFIGS[kind]
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"model.memory.{unknown[0]}", f"is not a key of the {kind} memory (its keys: "
                                                        f"{', '.join(k for k in known if k != 'kind')})")
    return cls(**values)


# ------------------------------------------------------------------------------------------------- model
@dataclass
class TitanConfig:
    """Model hyper-parameters. Derived sizes are properties, so overriding `hidden_size` alone keeps them
    consistent."""

    vocab_size: int = 259  # 256 bytes + BOS/EOS/PAD
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_hidden_layers: int = 2
    intermediate_size: Optional[int] = None  # SwiGLU width; None -> 8/3 * hidden rounded up to a multiple of 64
    # long-term memory
    use_memory: bool = True  # false: the same backbone without memory (the segment-local baseline)
    memory: Any = None  # the memory kind's config (tokens | slots | delta | neural); None -> TokensMemoryConfig()
    short_conv: int = 4  # kernel K of a causal depthwise convolution over each block's input before self-attention
    # (x + conv(x): H3's shift, Based's short convolution): a token also carries its K - 1 predecessors, so attention
    # can match a token by what preceded it; zero at init; 0: none
    short_conv_carry: bool = True  # with a memory, the convolution's last K - 1 inputs cross segment boundaries
    # with the memory state, so a token that starts a segment still carries its predecessors; without memory the
    # convolution restarts at each segment (the baseline stays segment-local)
    # segment recurrence
    segment_length: int = 64  # attention is causal inside a segment of this many tokens
    bptt_segments: int = 4  # segments per backprop window; memory is detached between windows
    windows_per_pass: int = 1  # BPTT windows run in one layer-major pass and one backward (gradients still stop
    # at every window boundary): fewer, larger calls when windows are short; peak activation memory grows with it
    # backbone details
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    init_std: float = 0.02
    # execution switches
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each layer's window step, reused every window
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | ...
    kernels: str = "auto"  # attention/fused-op backend: auto (Triton on CUDA when available, the tokens memory's
    # write loop compiled with Numba on CPU), triton, torch (PyTorch ops everywhere)

    def __post_init__(self) -> None:
        self.memory = memory_config({} if self.memory is None else self.memory)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_dim(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    @property
    def memory_kind(self) -> Optional[str]:
        """The memory kind in use, or None for the no-memory baselines."""
        return self.memory.kind if self.use_memory else None

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "segment_length",
                     "bptt_segments", "windows_per_pass"):
            _positive_int(f"model.{name}", getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("model.hidden_size", f"{self.hidden_size} is not divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ConfigError("model.hidden_size", f"head dim {self.head_dim} must be even for rotary embeddings")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ConfigError("model.intermediate_size", f"must be positive, got {self.intermediate_size}")
        if not isinstance(self.short_conv, int) or isinstance(self.short_conv, bool) or self.short_conv < 0 \
                or self.short_conv == 1:  # a kernel of 1 has no predecessor to carry
            raise ConfigError("model.short_conv", f"must be 0 (none) or an integer >= 2, got {self.short_conv!r}")
        if self.short_conv_carry and not self.short_conv:
            raise ConfigError("model.short_conv_carry", "needs model.short_conv >= 2 (a convolution to carry)")
        self.memory.validate(self)
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError("model.compile_mode",
                              f"must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.kernels not in KERNELS:
            raise ConfigError("model.kernels", f"must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.compile and self.kernels == "triton":
            raise ConfigError("model.kernels", "triton cannot be combined with model.compile=true (torch.compile "
                                               "fuses the PyTorch ops itself): use model.kernels=auto or torch")
        if self.vocab_size < 259:
            raise ConfigError("model.vocab_size", f"must be >= 259 for the byte tokenizer, got {self.vocab_size}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the memory config as a dict), as stored in checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TitanConfig":
        """From stored or composed values. A config written before the memory kinds (ltm < 0.2: memory_read,
        memory_write, memory_slots, ... at the top level) is migrated when it used a kind that still exists, and
        refused in one line when it used an option that was retired (docs/experiments/negative-results.md)."""
        from ltm_core.migration import migrate_model_config

        values = migrate_model_config(dict(values))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model.{unknown[0]}", "is not a model config key")
        return cls(**values)


def text_files(path: Path) -> list[Path]:
    """The .txt/.jsonl files of data.path (a file, or a folder searched recursively); one DataError line if none."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise DataError(f"data error: {path} holds no .txt or .jsonl files")
        return files
    if not path.exists():
        raise DataError(f"data error: {path} does not exist")
    if path.suffix not in (".txt", ".jsonl"):
        raise DataError(f"data error: {path} is not a .txt or .jsonl file")
    return [path]


@dataclass
class DataConfig:
    name: str = "kjv"  # kjv | pystdlib | textfile | a task: passkey | mqar | babi_facts (generated, see cfg.task)
    path: Optional[str] = None  # textfile: a .txt/.jsonl file or a folder of them
    seq_len: Optional[int] = None  # tokens per sample (train: whole segments; eval: any); None -> 4 segments
    batch_size: int = 8
    val_fraction: float = 0.05  # textfile: share of the tokens held out for validation; pystdlib: of the modules
    val_books: int = 2  # kjv: the last N books are the validation split
    val_samples: int = 64  # validation sequences evaluated per validation run
    num_workers: int = 0
    cache_dir: Optional[str] = None  # where token caches go; None -> ~/.cache/ltm
    seed: int = 1234


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    schedule_steps: Optional[int] = None  # cosine length; None -> trainer.max_steps
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self) -> None:
        checks = {"lr": self.lr > 0, "min_lr_ratio": 0 <= self.min_lr_ratio <= 1, "weight_decay": self.weight_decay >= 0,
                  "beta1": 0 <= self.beta1 < 1, "beta2": 0 <= self.beta2 < 1, "warmup_steps": self.warmup_steps >= 0,
                  "schedule_steps": self.schedule_steps is None or self.schedule_steps > 0,
                  "grad_clip": self.grad_clip >= 0}
        wanted = {"lr": "positive", "min_lr_ratio": "in [0, 1]", "weight_decay": "0 or more", "beta1": "in [0, 1)",
                  "beta2": "in [0, 1)", "warmup_steps": "0 or more", "schedule_steps": "positive or null",
                  "grad_clip": "0 (off) or more"}
        for key, ok in checks.items():
            if not ok:  # (also nan)
                raise ConfigError(f"optim.{key}", f"must be {wanted[key]}, got {getattr(self, key)}")


@dataclass
class PrecisionConfig:
    name: str = "fp32"  # Lightning precision string: 32-true | bf16-mixed | 16-mixed | bf16-true
    lightning: str = "32-true"


@dataclass
class ParallelConfig:
    """Process layout. dp × tp × pp = world size = devices × num_nodes (see docs/distributed.md).

    `strategy`: auto | ddp run Lightning (single process / DistributedDataParallel); native runs the
    torch.distributed loop of `ltm_core.parallel` (FSDP2 over dp, tensor and pipeline parallelism), and is used
    whenever tp > 1 or pp > 1."""

    name: str = "single"
    strategy: str = "auto"  # auto | ddp (Lightning) | native (ltm_core.parallel: FSDP2 / TP / PP)
    devices: Optional[int] = 1  # processes per node; None -> from the layout (dp × tp × pp / num_nodes)
    num_nodes: int = 1
    dp: int = -1  # data-parallel degree (FSDP2 fully_shard with strategy=native); -1 -> the rest of the world
    tp: int = 1  # tensor-parallel degree (heads, SwiGLU and memory projections split over tp ranks)
    pp: int = 1  # pipeline stages (blocks split over pp ranks)
    schedule: str = "1f1b"  # pipeline schedule: gpipe | 1f1b | interleaved (2 stages per pp rank)
    microbatches: int = 1  # pipeline microbatches per batch (data.batch_size must be divisible by it)
    force: bool = False  # start a local CPU launch even with more processes than cores or too little free memory


@dataclass
class TrainerConfig:
    max_steps: int = 600
    accumulate_grad_batches: int = 1
    val_check_interval: int = 100  # validate every N optimizer steps (and at the end)
    save_every_n_steps: Optional[int] = None  # write checkpoints/last.ckpt every N optimizer steps (and at the end);
    # None: at each validation (val_check_interval)
    log_every_n_steps: int = 10
    accelerator: str = "auto"  # auto | cpu | gpu
    progress: bool = True  # rich progress bar
    tensorboard: bool = False
    deterministic: bool = False
    # reliability (docs/reliability.md)
    checkpoint_every_minutes: Optional[float] = 5.0  # also save last.ckpt on this wall-clock interval; null/0: off
    max_bad_steps: int = 3  # stop after this many consecutive steps with a non-finite loss or gradient (skipped)
    threads: Optional[int] = None  # torch intra-op threads per process; None -> OMP_NUM_THREADS, else the
    # available cores (affinity, cgroup quota) shared by the local processes


TASK_NAMES = ("passkey", "mqar", "babi_facts")
TASK_FILLERS = ("ruler", "kjv", "mixed")


@dataclass
class TaskConfig:
    """A long-context task (`ltm_core.tasks`): the training data of `data=<task>` and the grid of `ltm eval
    task=<task>`. One flat schema for all tasks; each task reads the keys it needs."""

    name: Optional[str] = None  # passkey | mqar | babi_facts; None: no task
    # evaluation grid
    lengths: Optional[list[int]] = None  # context lengths in tokens; None -> 1x, 4x, 16x, 64x data.seq_len
    samples: int = 100  # samples per cell of the grid
    batch_size: int = 50  # samples read together
    seed: int = 0  # evaluation samples are a pure function of (seed, cell, index)
    # passkey
    digits: int = 5  # digits of the pass key
    filler: str = "mixed"  # haystack: ruler (RULER's repeated sentences) | kjv | mixed (either, per sample)
    filler_start: str = "first"  # where the RULER filler starts: first (its first character, as RULER) | random (a
    # random character, so that training sees every phase of the repeated sentences against the segments). Not
    # carried from the checkpoint into `ltm eval`: evaluation starts at the first character unless given
    depth_bins: int = 10  # needle depth bins over 0-100 % of the haystack
    placement_checks: bool = True  # also cells with the needle in the first segment / straddling a boundary
    # mqar
    pairs: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])  # key-value pairs per cell
    train_pairs: int = 32  # training samples hold 1..train_pairs pairs
    gap_segments: int = 1  # whole segments of noise between the segment of the last pair and the queries
    key_length: int = 2  # characters per key: 2 (676 two-letter keys) | 1 (36 keys: a letter or a digit)
    # babi_facts
    facts: int = 6  # location facts per sample
    names: int = 4  # people the facts are about (at most 6)
    train_facts: Optional[int] = None  # training samples hold 1..train_facts facts (easy samples among hard ones);
    # None: exactly `facts`, as evaluated
    # sample layout
    layout_segment: Optional[int] = None  # the segment length samples are laid out for (mqar's gap segments,
    # passkey's first-segment and straddle cells); None: the model's. Set to the memory model's segment length, a
    # full-causal reference reads exactly the memory model's samples (experiment=mqar_full)
    # training on the task
    lm_loss: bool = False  # also a next-byte loss on the filler; default: loss on the scored tokens only

    def validate(self) -> None:
        if self.name not in TASK_NAMES:
            raise ConfigError("task.name", f"must be one of {', '.join(TASK_NAMES)}, got {self.name!r}")
        positive = ("samples", "batch_size", "digits", "depth_bins", "train_pairs", "gap_segments", "facts", "names")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"task.{key}", f"must be a positive integer, got {value!r}")
        if self.lengths is not None and (not self.lengths or any(n <= 0 for n in self.lengths)):
            raise ConfigError("task.lengths", f"must be a non-empty list of positive lengths, got {self.lengths}")
        if self.key_length not in (1, 2):
            raise ConfigError("task.key_length", f"must be 1 or 2, got {self.key_length!r}")
        keys = {1: 36, 2: 676}[self.key_length]
        if not self.pairs or any(p <= 0 or p > 676 for p in self.pairs):  # cells past the key count are skipped
            raise ConfigError("task.pairs", f"must be a non-empty list of pair counts in [1, 676], got {self.pairs}")
        if self.train_pairs > keys:
            raise ConfigError("task.train_pairs",
                              f"must be at most {keys} ({self.key_length}-character keys), got {self.train_pairs}")
        if self.filler not in TASK_FILLERS:
            raise ConfigError("task.filler", f"must be one of {', '.join(TASK_FILLERS)}, got {self.filler!r}")
        if self.filler_start not in ("first", "random"):
            raise ConfigError("task.filler_start", f"must be first or random, got {self.filler_start!r}")
        if self.digits > 20:
            raise ConfigError("task.digits", f"must be at most 20, got {self.digits}")
        if self.train_facts is not None and (not isinstance(self.train_facts, int) or self.train_facts <= 0):
            raise ConfigError("task.train_facts", f"must be a positive integer or null, got {self.train_facts!r}")
        if self.names > 6:
            raise ConfigError("task.names", f"must be at most 6, got {self.names}")
        if self.layout_segment is not None and (not isinstance(self.layout_segment, int)
                                                or isinstance(self.layout_segment, bool) or self.layout_segment <= 0):
            raise ConfigError("task.layout_segment", f"must be a positive integer or null, got {self.layout_segment!r}")

    def layout(self, segment_length: int) -> int:
        """The segment length samples are laid out for, given the model's."""
        return self.layout_segment if self.layout_segment is not None else segment_length


@dataclass
class TrainRunConfig:
    model: TitanConfig = field(default_factory=TitanConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)  # long-context task: data=<task> / ltm eval task=<task>
    output_dir: Optional[str] = None  # None -> outputs/<timestamp>
    resume: Optional[str] = None  # auto: continue from OUTPUT_DIR/checkpoints/last.ckpt; or a checkpoint path
    continues: Optional[str] = None  # stage 2: the experiment it continues, whose checkpoint resume= must give
    overwrite: bool = False  # allow reusing an output folder that holds another run
    seed: int = 42
