"""The one config schema.

`TitanConfig` describes the model; the other dataclasses describe a training run. Hydra composes YAML files from
`conf/` on top of these dataclasses (registered in its ConfigStore by `ltm_core.configuration`), so a wrong
type or an unknown key is caught by OmegaConf, and `validate()` checks the values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from ltm_core.errors import ConfigError

MEMORY_READS = ("cross", "context", "tokens")
MEMORY_WRITES = ("gated", "importance", "select", "delta")
WRITE_FROM = ("block", "attention")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
KERNELS = ("auto", "triton", "torch")


@dataclass
class TitanConfig:
    """Model hyper-parameters. Derived sizes are properties, so overriding
    `hidden_size` alone keeps them consistent."""

    vocab_size: int = 259  # 256 bytes + BOS/EOS/PAD
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_hidden_layers: int = 2
    intermediate_size: Optional[int] = None  # SwiGLU width; None -> 8/3 * hidden rounded up to a multiple of 64
    # long-term memory
    use_memory: bool = True
    memory_slots: int = 32  # M: slots per memory layer
    memory_dim: int = 64  # D: width of a slot
    memory_heads: Optional[int] = None  # heads of the memory read; None -> num_attention_heads
    memory_read: str = "cross"  # cross: separate cross-attention; context: slots prepended to the keys/values;
    # tokens (with memory_write=select, memory_dim = hidden_size): the memory keeps tokens as the self-attention
    # sees them (their normed inputs) and the self-attention reads them through its own key/value projections, as
    # if the kept tokens were still in its window (a KV cache of the important tokens)
    update_gate_bias: float = -2.0  # initial b_u: sigmoid(-2) ~ 0.12, a memory that starts by mostly keeping
    memory_write: str = "gated"  # gated: slots read the segment, update gate; importance: slots read the tokens
    # in proportion to their importance and write only as much as that importance (filler leaves memory intact);
    # select: the memory keeps the memory_slots most important compressed tokens (no query/key/value/update);
    # delta: an associative memory, a linear map from keys (memory_dim) to values (memory_slots) written by the
    # delta rule (Titans' linear memory, DeltaNet) and read as mem @ q
    select_noise: float = 0.5  # select, in training only: Gumbel noise on the importance before the top-k, scaled
    # by this times the spread (std) of the candidates' importance: sampling without replacement, so tokens that
    # the ranking would drop are sometimes kept, and a larger importance cannot switch the sampling off; 0: exact
    importance_penalty: float = 0.0  # select, in training only: adds this times the mean sigmoid(w_s . c) of each
    # written segment's tokens to the loss (through the write's backward; not in the logged loss), so tokens the
    # reads do not need sink in the ranking: a needle kept among the top M at the training length then also
    # outranks the filler of haystacks many times longer; 0: off
    importance_relative: bool = False  # select: the kept entries' straight-through factor and the penalty use
    # sigmoid(w_s . c - t), t the M-th highest importance among the candidates, not sigmoid(w_s . c): a common
    # shift of every importance changes neither, so the penalty cannot push them all into the sigmoid's flat tail,
    # where the reads no longer teach the ranking anything
    importance_zloss: float = 0.0  # select, in training only: adds this times the mean squared importance
    # (w_s . c)^2 of each written segment's tokens to the loss (as the router z-loss of ST-MoE keeps router logits
    # small): the importances stay near 0, where the sigmoid's slope lets the reads teach the ranking, instead of
    # drifting with the penalty into its flat tail (where Adam's eps stops the weights); 0: off
    importance_detach: float = 0.0  # select: the share (0..1) of the penalty's and the z-loss's gradient that is
    # withheld from the compressed tokens c and the layers below (1 or true: they train the importance weights w_s
    # only); through c the penalty can teach every token one shared direction that pushes all importances down
    # together, into the sigmoid's flat tail, where the reads no longer teach the ranking (README, "Why seeds differ")
    select_dedup: Optional[float] = None  # select: a candidate whose cosine similarity to a higher-ranked one
    # exceeds this is ranked after every distinct one (near-duplicate suppression, as Fast NMS): a periodic
    # haystack cannot fill the slots with copies of its best filler token; None: off
    select_grad: str = "sigmoid"  # select: the kept entries' straight-through factor, 1 + f - f.detach() (= 1), with
    # f = sigmoid(w_s . c) (sigmoid) or f = w_s . c with c held fixed (logit: it trains w_s only): through it the
    # reads teach the ranking; the sigmoid's slope vanishes in its flat tail, where the penalty leaves the
    # importances (about -10: slope 5e-5), the logit's does not (README, "Where a long haystack beats the key")
    write_from: str = "block"  # what the memory write compresses: block (the block's output) or attention (the
    # state after self-attention, before the memory read: what a segment writes does not depend on the memory)
    slot_positions: bool = False  # a learned vector per slot added to the memory before the read's keys/values:
    # the select write keeps entries in arrival order (slot M-1 newest), so the read can prefer the latest entry
    slot_order: str = "arrival"  # slot_positions: arrival (an entry's place among all entries) | important (its
    # place among the entries with importance w_s . entry > 0; the others share one vector): unimportant entries
    # kept before a needle then do not move its positions (select only)
    read_importance: bool = False  # select: the memory read adds log sigmoid(importance) of each entry to its
    # attention scores, so the read prefers what the write ranks high and importance learns from every read
    read_qk_norm: bool = False  # memory_read=cross: RMSNorm (learned gain) on each head's read queries and slot
    # keys, so a read score is sqrt(head_dim) * cosine from the first step instead of a near-uniform softmax
    memory_conv: int = 0  # kernel of a causal depthwise convolution over the compressed tokens before the write
    # (Titans' short convolution), across segment boundaries: each written token also carries its predecessors;
    # with memory_write=delta it runs on the keys only, after their projection (a token stored under its
    # predecessor); 0: none
    memory_conv_mix: str = "depthwise"  # memory_conv: depthwise (one weight per channel and tap) | full (a D x D map
    # per tap: each predecessor can land in its own subspace of the entry)
    short_conv: int = 0  # kernel K of a causal depthwise convolution over each block's input before self-attention
    # (x + conv(x); H3's shift, Based's short convolution, Canon-A): a token also carries its K - 1 predecessors,
    # so attention can match a token by what preceded it (associative recall learns in a fraction of the steps:
    # README, MQAR); inside the segment, zeros before its first token as attention sees nothing before it (so the
    # no-memory baselines stay segment-local); zero at init; 0: none
    short_conv_carry: bool = False  # short_conv with a memory: the convolution's last K - 1 inputs cross segment
    # boundaries with the memory state (Mamba's conv state), so a token that starts a segment still carries its
    # predecessors (a key split by a boundary); without memory (use_memory=false) the convolution restarts at each
    # segment, so the baselines stay segment-local
    # segment recurrence
    segment_length: int = 64  # attention is causal inside a segment of this many tokens
    bptt_segments: int = 2  # segments per backprop window; memory is detached between windows
    # backbone details
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    init_std: float = 0.02
    # execution switches
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile the whole-segment step (blocks + memory writes), reused every segment
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | ...
    kernels: str = "auto"  # attention/fused-op backend: auto (Triton on CUDA when available), triton, torch

    def __post_init__(self) -> None:
        self.validate()

    def _validate_tokens_read(self) -> None:
        """memory_read=tokens: an entry is a token's normed self-attention input, kept as it is."""
        if self.memory_write != "select":
            raise ConfigError("model.memory_read", f"tokens keeps whole tokens: needs model.memory_write=select, got "
                                                   f"{self.memory_write!r}")
        if self.memory_dim != self.hidden_size:
            raise ConfigError("model.memory_dim", f"must equal model.hidden_size={self.hidden_size} with "
                                                  f"memory_read=tokens (a slot holds a token), got {self.memory_dim}")
        changed = {"write_from": "block", "memory_conv": 0, "slot_positions": False}  # they reshape the entries
        for key, default in changed.items():
            if getattr(self, key) != default:
                raise ConfigError(f"model.{key}", "does not apply to memory_read=tokens (an entry is the token "
                                                  "as the self-attention sees it)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_dim(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    @property
    def num_memory_heads(self) -> int:
        return self.memory_heads or self.num_attention_heads

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "segment_length",
                    "bptt_segments", "memory_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name}", f"must be a positive integer, got {value!r}")
        if self.memory_slots < 0:
            raise ConfigError("model.memory_slots", f"must be >= 0, got {self.memory_slots}")
        if self.use_memory and self.memory_slots == 0:
            raise ConfigError("model.memory_slots", "must be > 0 when model.use_memory=true")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("model.hidden_size", f"{self.hidden_size} is not divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ConfigError("model.hidden_size", f"head dim {self.head_dim} must be even for rotary embeddings")
        heads = self.memory_heads or self.num_attention_heads
        if heads <= 0 or self.hidden_size % heads:
            raise ConfigError("model.memory_heads", f"{heads} must divide model.hidden_size={self.hidden_size}")
        if self.memory_read in ("context", "tokens") and heads != self.num_attention_heads:
            raise ConfigError("model.memory_heads",
                              f"must equal model.num_attention_heads with memory_read={self.memory_read}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ConfigError("model.intermediate_size", f"must be positive, got {self.intermediate_size}")
        if not isinstance(self.memory_conv, int) or isinstance(self.memory_conv, bool) or self.memory_conv < 0:
            raise ConfigError("model.memory_conv", f"must be an integer >= 0, got {self.memory_conv!r}")
        for key in ("select_noise", "importance_penalty", "importance_zloss"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < 0:
                raise ConfigError(f"model.{key}", f"must be a number >= 0, got {getattr(self, key)!r}")
        if not isinstance(self.importance_detach, (int, float)) or not 0 <= self.importance_detach <= 1:
            raise ConfigError("model.importance_detach",
                              f"must be a number in [0, 1] (true: 1), got {self.importance_detach!r}")
        if self.select_dedup is not None and (isinstance(self.select_dedup, bool)
                                              or not isinstance(self.select_dedup, (int, float))
                                              or not 0 < self.select_dedup <= 1):
            raise ConfigError("model.select_dedup", f"must be a cosine in (0, 1] or null, got {self.select_dedup!r}")
        if self.select_grad not in ("sigmoid", "logit"):
            raise ConfigError("model.select_grad", f"must be sigmoid or logit, got {self.select_grad!r}")
        if self.select_grad == "logit" and self.importance_relative:
            raise ConfigError("model.select_grad", "logit replaces importance_relative's factor: use one")
        defaults = {f.name: f.default for f in fields(self)}
        for key in ("importance_penalty", "importance_zloss", "importance_detach", "importance_relative",
                    "read_importance", "select_grad", "select_dedup"):  # options of the select write: set = not off
            if getattr(self, key) != defaults[key] and self.memory_write != "select":
                raise ConfigError(f"model.{key}", f"needs model.memory_write=select, got {self.memory_write!r}")
        if self.importance_relative and (self.read_importance or self.slot_order == "important"):
            raise ConfigError("model.importance_relative", "leaves the absolute importance free, which "
                                                           "read_importance and slot_order=important read: use one")
        if self.memory_write not in MEMORY_WRITES:
            raise ConfigError("model.memory_write",
                              f"must be one of {', '.join(MEMORY_WRITES)}, got {self.memory_write!r}")
        if self.memory_write == "delta" and self.memory_read != "cross":
            raise ConfigError("model.memory_read", f"memory_write=delta is read as mem @ q: needs cross, got "
                                                   f"{self.memory_read!r}")
        if self.memory_write == "delta" and self.slot_positions:
            raise ConfigError("model.slot_positions", "does not apply to memory_write=delta (a linear map has no "
                                                      "slots in arrival order)")
        if self.slot_order not in ("arrival", "important"):
            raise ConfigError("model.slot_order", f"must be arrival or important, got {self.slot_order!r}")
        if self.slot_order == "important" and not (self.slot_positions and self.memory_write == "select"):
            raise ConfigError("model.slot_order", "important needs model.slot_positions=true and "
                                                  "model.memory_write=select")
        if self.read_qk_norm and (not self.use_memory or self.memory_read != "cross"
                                  or self.memory_write == "delta"):
            raise ConfigError("model.read_qk_norm", "needs a memory (use_memory=true) read by attention over its "
                                                    "slots: memory_read=cross, not memory_write=delta")
        if not isinstance(self.short_conv, int) or isinstance(self.short_conv, bool) or self.short_conv < 0 \
                or self.short_conv == 1:  # a kernel of 1 has no predecessor to carry
            raise ConfigError("model.short_conv", f"must be 0 (none) or an integer >= 2, got {self.short_conv!r}")
        if self.short_conv_carry and not self.short_conv:
            raise ConfigError("model.short_conv_carry", "needs model.short_conv >= 2 (a convolution to carry)")
        if self.memory_conv_mix not in ("depthwise", "full"):
            raise ConfigError("model.memory_conv_mix", f"must be depthwise or full, got {self.memory_conv_mix!r}")
        if self.memory_conv_mix == "full" and not self.memory_conv:
            raise ConfigError("model.memory_conv_mix", "full needs model.memory_conv > 0")
        if self.write_from not in WRITE_FROM:
            raise ConfigError("model.write_from", f"must be one of {', '.join(WRITE_FROM)}, got {self.write_from!r}")
        if self.memory_read not in MEMORY_READS:
            raise ConfigError("model.memory_read", f"must be one of {', '.join(MEMORY_READS)}, got {self.memory_read!r}")
        if self.use_memory and self.memory_read == "tokens":
            self._validate_tokens_read()
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

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TitanConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model.{unknown[0]}", "is not a model config key")
        return cls(**values)


@dataclass
class DataConfig:
    name: str = "kjv"  # kjv | textfile | a task: passkey | mqar | babi_facts (generated, see cfg.task)
    path: Optional[str] = None  # textfile: a .txt/.jsonl file or a folder of them
    seq_len: Optional[int] = None  # tokens per training sample (a multiple of model.segment_length); None -> 4 segments
    batch_size: int = 8
    val_fraction: float = 0.05  # textfile: share of the tokens held out for validation
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
    log_every_n_steps: int = 10
    accelerator: str = "auto"  # auto | cpu | gpu
    progress: bool = True  # rich progress bar
    tensorboard: bool = False
    deterministic: bool = False
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
    overwrite: bool = False  # allow reusing an output folder that holds another run
    seed: int = 42
