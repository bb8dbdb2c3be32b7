"""The Lightning data module of text corpora (`ltm train data=kjv|pystdlib|textfile`).

Apart from `ltm_core.data` so that evaluation, generation, quantization and export load no Lightning (its import
is most of a CLI call's start-up time).
"""

from __future__ import annotations

from typing import Optional

import lightning as L
from torch.utils.data import DataLoader

from ltm_core.config import DataConfig
from ltm_core.data import Corpus, EvenWindows, RandomWindows, load_corpus


class TextDataModule(L.LightningDataModule):
    """Training batches from `RandomWindows`, validation from `EvenWindows`.

    Training restarts at the sample counter that the LightningModule keeps in its checkpoint
    (`samples_seen`), so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, cfg: DataConfig, corpus: Optional[Corpus] = None):
        super().__init__()
        self.cfg = cfg
        self.corpus = corpus

    def setup(self, stage: Optional[str] = None) -> None:
        if self.corpus is None:
            self.corpus = load_corpus(self.cfg)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        module = trainer.lightning_module if trainer is not None else None
        start = int(getattr(module, "samples_seen", 0))
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        data = RandomWindows(self.corpus.train, self.cfg.seq_len, self.cfg.seed, start * world, rank, world,
                             batch_size=self.cfg.batch_size)
        return DataLoader(data, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        data = EvenWindows(self.corpus.val, self.cfg.seq_len, self.cfg.val_samples)
        return DataLoader(data, batch_size=self.cfg.batch_size, num_workers=self.cfg.num_workers)
