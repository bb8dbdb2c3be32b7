"""`Trainer` / `TrainingArguments`: the Hugging-Face-style Python entry to the same Lightning run as `ltm train`.

    from ltm_core import Trainer, TrainingArguments
    Trainer(model=model, args=TrainingArguments(output_dir="runs/a", learning_rate=3e-3,
            per_device_train_batch_size=8, gradient_accumulation_steps=1), train_dataset=dataset).train()

Each argument is one key of the run config (`ltm config show`), and `train()` runs `ltm_core.train.fit`: the windowed
backward, checkpoints/last.ckpt (and best.ckpt with an eval set), metrics.csv, config.yaml and exact resume. A
dataset is a path (a .txt/.jsonl file or a folder, as `data=textfile`: random windows of `seq_len` tokens, the
last `val_fraction` held out for validation) or a map-style `torch.utils.data.Dataset` (or a plain list) whose items are 1-D tensors of L + 1
token ids (inputs and next-token labels) or (input_ids, labels) pairs of L ids each (labels -100: no loss).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ltm_core.config import DataConfig
from ltm_core.configuration import compose, config_error, to_dict, validate
from ltm_core.data import load_corpus
from ltm_core.errors import ConfigError, DataError, LtmError
from ltm_core.model import TitanModel

DatasetLike = Union[Dataset, Sequence, str, Path]


@dataclass
class TrainingArguments:
    """Hugging Face's names for the run config's keys (each comment names the key it sets)."""

    output_dir: str  # output_dir: config.yaml, metrics.csv, checkpoints/
    learning_rate: float = 3e-3  # optim.lr (peak; linear warm-up, then cosine decay)
    per_device_train_batch_size: int = 8  # data.batch_size
    per_device_eval_batch_size: Optional[int] = None  # validation batch of a Dataset; None: the training one
    gradient_accumulation_steps: int = 1  # trainer.accumulate_grad_batches
    max_steps: int = 600  # trainer.max_steps (optimizer steps)
    warmup_steps: int = 20  # optim.warmup_steps
    schedule_steps: Optional[int] = None  # optim.schedule_steps: the cosine's length; None: max_steps (set it to
    # stop a run early and resume it into the longer one)
    weight_decay: float = 0.1  # optim.weight_decay
    max_grad_norm: float = 1.0  # optim.grad_clip (0: no clipping)
    logging_steps: int = 10  # trainer.log_every_n_steps (rows of metrics.csv)
    eval_steps: int = 100  # trainer.val_check_interval
    save_steps: Optional[int] = None  # trainer.save_every_n_steps (last.ckpt); None: at each evaluation
    precision: str = "fp32"  # precision=fp32 | bf16-mixed | fp16-mixed | bf16-true
    seed: int = 42  # seed and data.seed (training noise such as the select write's, the order of the samples)
    seq_len: Optional[int] = None  # a path dataset's tokens per sample (data.seq_len); None: 4 segments
    eval_samples: int = 64  # a path dataset's validation windows (data.val_samples)
    overwrite_output_dir: bool = False  # overwrite: replace the run an output_dir holds
    accelerator: str = "auto"  # trainer.accelerator: auto | cpu | gpu
    dataloader_num_workers: int = 0  # data.num_workers
    progress_bar: bool = True  # trainer.progress


class Trainer:
    """Trains `model` (its current weights are the start) on `train_dataset`, validating on `eval_dataset` (a path
    dataset validates on its held-out split; a Dataset without `eval_dataset` is not validated)."""

    def __init__(self, model: TitanModel, args: TrainingArguments, train_dataset: DatasetLike,
                 eval_dataset: Optional[DatasetLike] = None):
        if not isinstance(model, TitanModel):
            raise ConfigError("model", f"must be a TitanModel, got {type(model).__name__}")
        self.model, self.args = model, args
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.config = self._run_config()  # bad arguments fail here, before anything is written
        self.checks: dict[str, ItemCheck] = {}  # each dataset's item check (item 0's length: every item's)
        if not _is_path(train_dataset):
            for name, data in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
                if data is not None:
                    self.checks[name] = _check_dataset(name, data, model.config.vocab_size)

    def _run_config(self):
        args, model_cfg = self.args, self.model.config
        if _is_path(self.eval_dataset) and not _is_path(self.train_dataset):
            raise ConfigError("eval_dataset", "a path evaluates a path train_dataset (its held-out split); give a "
                                              "Dataset here, or train on the path")
        if _is_path(self.train_dataset) and self.eval_dataset is not None:
            raise ConfigError("eval_dataset", "a path train_dataset is validated on its own held-out split "
                                              "(data.val_fraction); leave eval_dataset unset")
        # the model's memory kind picks its config group (model/memory=<kind>), whose schema then takes its values
        kind = getattr(model_cfg.memory, "kind", None)
        cfg = compose([f"precision={args.precision}"] + ([f"model/memory={kind}"] if kind else []))
        values: dict[str, Any] = {
            "output_dir": str(args.output_dir), "seed": args.seed, "overwrite": args.overwrite_output_dir,
            "model": asdict(model_cfg),
            "optim": {"lr": args.learning_rate, "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay,
                      "grad_clip": args.max_grad_norm, "schedule_steps": args.schedule_steps},
            "trainer": {"max_steps": args.max_steps, "accumulate_grad_batches": args.gradient_accumulation_steps,
                        "val_check_interval": args.eval_steps, "save_every_n_steps": args.save_steps,
                        "log_every_n_steps": args.logging_steps, "accelerator": args.accelerator,
                        "progress": args.progress_bar},
            "data": {"batch_size": args.per_device_train_batch_size, "num_workers": args.dataloader_num_workers,
                     "seed": args.seed,
                     "seq_len": args.seq_len or 4 * model_cfg.segment_length, "val_samples": args.eval_samples},
        }
        if _is_path(self.train_dataset):
            values["data"].update(name="textfile", path=str(Path(self.train_dataset).expanduser()))
        else:
            values["data"]["name"] = "dataset"  # in-memory samples: `ltm eval` of these checkpoints names its data=
        try:
            cfg = OmegaConf.merge(cfg, values)
        except OmegaConfBaseException as exc:
            raise config_error(exc) from None
        validate(cfg)
        return cfg

    def train(self, resume_from_checkpoint: Union[bool, str, Path, None] = None) -> Path:
        """Run training; returns checkpoints/last.ckpt. `resume_from_checkpoint`: True continues the run in
        output_dir (resume=auto), a path continues from that .ckpt, None starts anew."""
        from ltm_core.train import fit, holds_run, run_in_output_dir

        cfg = self.config.copy()
        if resume_from_checkpoint is True:
            cfg.resume = "auto"
        elif resume_from_checkpoint:
            cfg.resume = str(resume_from_checkpoint)
        if cfg.resume not in (None, "auto") and not str(cfg.resume).endswith(".ckpt"):
            raise ConfigError("resume_from_checkpoint", f"must be True or a .ckpt path, got {cfg.resume!r}")
        out = Path(cfg.output_dir)
        # (the CLI's message names its own keys: resume=auto, overwrite=true)
        if holds_run(out) and cfg.resume != "auto" and not cfg.overwrite:
            raise LtmError(f"output error: {out} already holds a run; call train(resume_from_checkpoint=True) to "
                           "continue it, pass TrainingArguments(overwrite_output_dir=True) to replace it, or choose "
                           "another output_dir")
        # a model handed over in eval mode (`TitanModel(cfg).eval()`, or after an InferenceEngine) trains in training
        # mode (TitanLightning.on_train_start sets it too, but Lightning warns of eval-mode modules before that)
        self.model.train()
        if _is_path(self.train_dataset):
            corpus = load_corpus(DataConfig(**to_dict(cfg.data)))  # bad data fails before anything is written
            return run_in_output_dir(cfg, lambda: fit(cfg, corpus, model=self.model))
        datamodule = DatasetDataModule(self.train_dataset, self.eval_dataset, int(cfg.data.batch_size),
                                       self.args.per_device_eval_batch_size or int(cfg.data.batch_size),
                                       int(cfg.data.seed), int(cfg.data.num_workers),
                                       self.checks.get("train_dataset"), self.checks.get("eval_dataset"))
        return run_in_output_dir(cfg, lambda: fit(cfg, datamodule=datamodule, model=self.model))


def _is_path(data: Any) -> bool:
    return isinstance(data, (str, Path))


def _is_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2


def as_pair(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A dataset item -> (input_ids [L], labels [L]): a 1-D tensor of L + 1 ids is split into inputs and next-token
    labels; an (input_ids, labels) pair is kept. Unchecked (`ItemCheck` checks, and refuses what this would cast)."""
    if _is_pair(item):
        return torch.as_tensor(item[0], dtype=torch.long), torch.as_tensor(item[1], dtype=torch.long)
    ids = torch.as_tensor(item, dtype=torch.long)
    return ids[:-1], ids[1:]


class DatasetItemError(DataError):
    """A dataset item the training loop cannot use: one line naming the item and what is wrong. Raised in a
    DataLoader worker, it arrives re-raised with the worker's traceback as its message (torch's ExceptionWrapper):
    the message is then cut back to the original line."""

    def __init__(self, message: str):
        if "\nOriginal Traceback" in message:
            line = message.rstrip().splitlines()[-1]
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            message = line[len(prefix):] if line.startswith(prefix) else line
        super().__init__(message)


@dataclass(frozen=True)
class ItemCheck:
    """The check of a Dataset's items, run on each item as it is drawn (training and validation), so that a bad
    item anywhere is one line (`DatasetItemError`) naming it, not a collation or an embedding error, and never
    trained on: integer token ids (floating-point values are refused, not cut to ids), one 1-D tensor of L + 1 ids
    or an (input_ids, labels) pair of 1-D tensors of L, ids in [0, vocab_size), labels there or -100, and the length
    of item 0 (a batch stacks its items). A few cheap passes over the item (dtype, shape, min/max)."""

    name: str  # train_dataset | eval_dataset
    vocab_size: int
    length: Optional[int] = None  # L, the input ids of item 0; None: not checked

    def __call__(self, index: int, item: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Dataset item number `index` -> (input_ids [L], labels [L]) int64, or a DatasetItemError."""
        where = f"{self.name}[{index}]"
        if _is_pair(item):
            inputs, labels = self._tensor(where, item[0], "input_ids"), self._tensor(where, item[1], "labels")
            if inputs.dim() != 1 or inputs.numel() == 0 or inputs.shape != labels.shape:
                raise DatasetItemError(f"data error: {where} must be an (input_ids, labels) pair of equal 1-D shapes "
                                       f"(or one 1-D tensor of L + 1 ids), got input_ids {tuple(inputs.shape)}, "
                                       f"labels {tuple(labels.shape)}")
        else:
            ids = self._tensor(where, item, "")
            if ids.dim() != 1 or ids.numel() < 2:
                raise DatasetItemError(f"data error: {where} must be a 1-D tensor of at least 2 token ids (or an "
                                       f"(input_ids, labels) pair of 1-D tensors), got shape {tuple(ids.shape)}")
            inputs, labels = ids[:-1], ids[1:]
        if self.length is not None and inputs.numel() != self.length:
            size = f"{inputs.numel()} input ids" if _is_pair(item) else f"{inputs.numel() + 1} ids"
            first = f"{self.length} input ids" if _is_pair(item) else f"{self.length + 1}"
            raise DatasetItemError(f"data error: {where} has {size}, {self.name}[0] has {first}: every item must "
                                   f"have the same length")
        low, high = (int(v) for v in torch.aminmax(inputs))
        if low < 0 or high >= self.vocab_size:
            raise DatasetItemError(f"data error: {where} holds token ids outside [0, {self.vocab_size}): min {low}, "
                                   f"max {high}")
        if _is_pair(item):
            valid = labels[labels != -100]
            if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= self.vocab_size):
                raise DatasetItemError(f"data error: {where} holds labels outside [0, {self.vocab_size}) that are "
                                       f"not -100 (no loss): min {int(valid.min())}, max {int(valid.max())}")
        return inputs.long(), labels.long()

    @staticmethod
    def _tensor(where: str, value: Any, part: str) -> torch.Tensor:
        """value as a tensor of its own dtype; integer token ids only."""
        what = f"{where}'s {part}" if part else where
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DatasetItemError(f"data error: {what} is not a tensor of token ids ({exc})") from None
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise DatasetItemError(f"data error: {what} holds {str(tensor.dtype).replace('torch.', '')} values, not "
                                   f"integer token ids: convert them with .long() if they are ids")
        return tensor


def _check_dataset(name: str, data: Any, vocab_size: int) -> ItemCheck:
    """One-line errors for a dataset the training loop could not use, before anything is written: not a map-style
    Dataset, empty, or item 0 bad. Returns the check every item then passes as it is drawn (item 0's length)."""
    if isinstance(data, (IterableDataset, bytes, bytearray)) or not (hasattr(data, "__len__")
                                                                      and hasattr(data, "__getitem__")):
        raise DataError(f"data error: {name} must be a path, a map-style torch.utils.data.Dataset or a sequence "
                        f"(a list of samples), got {type(data).__name__}")
    if len(data) == 0:
        raise DataError(f"data error: {name} is empty")
    inputs, _ = ItemCheck(name, vocab_size)(0, data[0])
    return ItemCheck(name, vocab_size, inputs.numel())


class DatasetStream(IterableDataset):
    """A map-style dataset as an endless stream, reshuffled every epoch: sample n (of this rank) is item
    perm_e[i % N] with i = start + rank + world * n, e = i // N and perm_e seeded by (seed, e), a pure function
    of (seed, i), so a resumed run continues the stream exactly. DataLoader workers make whole batches in turn, as
    `RandomWindows` does."""

    def __init__(self, dataset: Dataset, seed: int, start: int = 0, rank: int = 0, world: int = 1,
                 batch_size: int = 1, check: Optional[ItemCheck] = None):
        self.dataset, self.seed = dataset, seed
        self.start, self.rank, self.world, self.batch_size = start, rank, world, batch_size
        self.check = check  # run on each item drawn; None: items are cast unchecked (`as_pair`)

    def __iter__(self):
        size = len(self.dataset)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, order = -1, None
        for batch in itertools.count(worker, workers):
            for n in range(batch * self.batch_size, (batch + 1) * self.batch_size):
                i = self.start + self.rank + self.world * n
                if i // size != epoch:
                    epoch = i // size
                    order = np.random.default_rng([self.seed, epoch]).permutation(size)
                index = int(order[i % size])
                item = self.dataset[index]
                yield as_pair(item) if self.check is None else self.check(index, item)


class _Pairs(Dataset):
    def __init__(self, dataset: Dataset, check: Optional[ItemCheck] = None):
        self.dataset, self.check = dataset, check

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return as_pair(item) if self.check is None else self.check(i, item)


class DatasetDataModule(L.LightningDataModule):
    """Training batches from `DatasetStream` (restarting at the module's `samples_seen` on resume), validation
    over the whole eval dataset in order."""

    def __init__(self, train: Dataset, validation: Optional[Dataset], batch_size: int, eval_batch_size: int,
                 seed: int, num_workers: int = 0, train_check: Optional[ItemCheck] = None,
                 eval_check: Optional[ItemCheck] = None):
        super().__init__()
        self.train, self.eval = train, validation
        self.train_check, self.eval_check = train_check, eval_check  # each item checked as it is drawn
        self.batch_size, self.eval_batch_size, self.seed, self.num_workers = batch_size, eval_batch_size, seed, num_workers
        self.has_validation = validation is not None

    def describe(self) -> str:
        evaluated = f"{len(self.eval):,} validation samples" if self.eval is not None else "no validation"
        return f"dataset: {len(self.train):,} training samples, {evaluated}"

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        start = int(getattr(module, "samples_seen", 0))
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream = DatasetStream(self.train, self.seed, start * world, rank, world, self.batch_size, self.train_check)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Pairs(self.eval if self.eval is not None else [], self.eval_check),
                          batch_size=self.eval_batch_size,
                          num_workers=self.num_workers)
