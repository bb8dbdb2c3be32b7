"""What `ltm train` prints around Lightning: none of its adverts and banners, and the `generate` line of a run.

`quiet_lightning()` drops Lightning's tips (litlogger, litmodels), its accelerator banners (`GPU available`, `TPU
available`, `LOCAL_RANK ... CUDA_VISIBLE_DEVICES`), its two restore lines (ltm prints `resuming from ...`) and the
`Checkpoint directory ... exists and is not empty` warning of a resumed run (ltm refuses to reuse a folder unless
resume=auto or overwrite=true: that folder is expected). Everything else Lightning says still prints.
"""

from __future__ import annotations

import logging
import shlex
import warnings
from pathlib import Path
from typing import Iterable

from ltm_core.tokenizer import prompt_from

# the loggers Lightning's rank_zero_info / rank_zero_warn and its accelerators write to
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.pytorch.accelerators.cuda", "lightning.pytorch", "lightning.fabric")
NOISE = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:", "IPU available:", "LOCAL_RANK:",
         "Restoring states from the checkpoint", "Restored all states from the checkpoint")  # ltm says "resuming from"


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NOISE)


_DROP = _DropNoise()


def quiet_lightning() -> None:
    """Silence Lightning's adverts, banners and its resume warnings: a folder that holds checkpoints, and a resume
    from another run's folder (`resume=OTHER/last.ckpt`: the new run keeps its own best; checked by
    `test_a_stage_two_run_prints_no_lightning_warning`) (idempotent)."""
    for name in LIGHTNING_LOGGERS:
        if _DROP not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_DROP)
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r".*The dirpath has changed from")


def generate_command(checkpoint: Path, val_ids: Iterable[int]) -> str:
    """The `ltm generate` line printed after a run, prompted with the first words of its own validation data."""
    prompt = prompt_from(val_ids)
    command = f"generate:   ltm generate --checkpoint {shlex.quote(str(checkpoint))}"
    return command + (f" --prompt {shlex.quote(prompt)}" if prompt else "")
