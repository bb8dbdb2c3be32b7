"""Training on a task: generated samples instead of a corpus (`ltm train data=passkey`).

Training sample i is a pure function of (data.seed, i), like `ltm_core.data.RandomWindows`, so a resumed run
continues with exactly the samples an uninterrupted one would have seen. Validation uses a separate stream of
`data.val_samples` fixed samples at the training length. The loss is on the scored tokens (the answer), plus
next-byte prediction of the filler when task.lm_loss=true.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ltm_core.config import DataConfig, TaskConfig
from ltm_core.tasks.common import TRAIN_STREAM, VALIDATION_STREAM, sample_rng


class TaskSamples(IterableDataset):
    """Endless (input_ids, labels) pairs of `seq_len` tokens; sample i comes from rng (seed, 0, i).
    `start` is the first sample index; rank r of `world` takes samples start + r, start + r + world, ..."""

    def __init__(self, task_cfg: TaskConfig, seq_len: int, segment_length: int, seed: int, start: int = 0,
                 rank: int = 0, world: int = 1):
        from ltm_core.tasks import get_task

        self.task, self.cfg = get_task(task_cfg.name), task_cfg
        self.seq_len, self.segment_length, self.seed = seq_len, segment_length, seed
        self.start, self.rank, self.world = start, rank, world

    def sample(self, index: int, stream: int = TRAIN_STREAM):
        """Training pairs carry the filler's next-byte loss when task.lm_loss; validation pairs never do: the
        validation loss is the answer loss whatever the training loss."""
        rng = sample_rng(self.seed, stream, index)
        split = "train" if stream == TRAIN_STREAM else "eval"
        sample = self.task.train_sample(rng, self.seq_len + 1, self.cfg, self.segment_length, split)
        return sample.training_pair(self.cfg.lm_loss and stream == TRAIN_STREAM)

    def __iter__(self):
        i = self.start + self.rank
        while True:
            yield self.sample(i)
            i += self.world


class ValidationSamples(Dataset):
    """`n` fixed validation samples (stream 1, filler from the held-out KJV books)."""

    def __init__(self, samples: TaskSamples, n: int):
        self.samples, self.n = samples, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.samples.sample(i, VALIDATION_STREAM)


class TaskDataModule(L.LightningDataModule):
    """The task counterpart of `ltm_core.datamodule.TextDataModule` (same resume contract: `samples_seen`)."""

    def __init__(self, cfg: DataConfig, task_cfg: TaskConfig, segment_length: int):
        super().__init__()
        self.cfg, self.task_cfg = cfg, task_cfg
        self.segment_length = task_cfg.layout(segment_length)  # what the samples are laid out for

    def _samples(self, start: int = 0, rank: int = 0, world: int = 1) -> TaskSamples:
        return TaskSamples(self.task_cfg, self.cfg.seq_len, self.segment_length, self.cfg.seed, start, rank, world)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        start = int(getattr(module, "samples_seen", 0))
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        data = self._samples(start * world, rank, world)
        return DataLoader(data, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        data = ValidationSamples(self._samples(), self.cfg.val_samples)
        return DataLoader(data, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers)

    def describe(self) -> str:
        return (f"task {self.task_cfg.name}: generated samples of {self.cfg.seq_len} tokens, loss on "
                f"{'all tokens' if self.task_cfg.lm_loss else 'the answer tokens'}")


def task_config(cfg) -> Optional[TaskConfig]:
    """The TaskConfig of a run config (DictConfig or dict) whose data is a task, else None."""
    from omegaconf import DictConfig, OmegaConf

    from ltm_core.tasks import is_task

    data_name = cfg["data"]["name"]
    if not is_task(data_name):
        return None
    task = cfg["task"]
    values = OmegaConf.to_container(task, resolve=True) if isinstance(task, DictConfig) else dict(task)
    return TaskConfig(**values)
