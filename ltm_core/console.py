"""What `ltm train` prints around Lightning: none of its adverts and banners, and the `generate` line of a run.

`quiet_lightning()` drops Lightning's tips (litlogger, litmodels), its accelerator banners (`GPU available`, `TPU
available`, `LOCAL_RANK ... CUDA_VISIBLE_DEVICES`), its two restore lines (ltm prints `resuming from ...`) and the
`Checkpoint directory ... exists and is not empty` warning of a resumed run (ltm refuses to reuse a folder unless
resume=auto or overwrite=true: that folder is expected), the callbacks warning of a resume with other trainer
settings, and parallel=ddp's `Initializing distributed` / `distributed_backend=` banners. Everything else Lightning says still prints.

`generate_command` is the `ltm generate` line printed after a run: for text, prompted with the first words of the
run's validation data; for a task (`data=passkey|mqar|babi_facts`), with its first validation sample up to where
the answer starts (`task_prompt`), `-n` the answer's length and greedy decoding, so the line shows the model
answering. The prompt is quoted for bash (`shell_quote`): `$'...'` with escapes when it holds a newline, another
control character or a byte outside printable ASCII, so `ltm generate` receives exactly those bytes.
"""

from __future__ import annotations

import logging
import shlex
import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ltm_core.tokenizer import prompt_from

IGNORE_INDEX = -100  # labels that are not scored (ltm_core.tasks.common.TaskSample.training_pair)

# the loggers Lightning's rank_zero_info / rank_zero_warn and its accelerators write to
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "lightning.pytorch.accelerators.cuda", "lightning.pytorch", "lightning.fabric")
NOISE = ("💡 Tip:", "GPU available:", "TPU available:", "HPU available:", "IPU available:", "LOCAL_RANK:",
         "Restoring states from the checkpoint", "Restored all states from the checkpoint",  # ltm says "resuming from"
         "Initializing distributed:", "-" * 100 + "\ndistributed_backend=")  # parallel=ddp: each rank's, rank 0's
DISTRIBUTED_LOGGER = "lightning.fabric.utilities.distributed"  # the `Initializing distributed: GLOBAL_RANK` line


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NOISE)


_DROP = _DropNoise()


def quiet_lightning() -> None:
    """Silence Lightning's adverts, banners and its resume warnings: a folder that holds checkpoints, and a resume
    from another run's folder (`resume=OTHER/last.ckpt`: the new run keeps its own best; checked by
    `test_a_stage_two_run_prints_no_lightning_warning`) (idempotent)."""
    for name in (*LIGHTNING_LOGGERS, DISTRIBUTED_LOGGER):
        if _DROP not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_DROP)
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r".*The dirpath has changed from")
    # a resume with other callback settings (trainer.val_check_interval): ltm builds its callbacks from the config
    warnings.filterwarnings("ignore", message=r".*Be aware that when using `ckpt_path`, callbacks used to create")


def generate_command(checkpoint: Path, val_ids: Iterable[int], answer_length: Optional[int] = None) -> str:
    """The `ltm generate` line printed after a run. Without `answer_length`: prompted with the first words of its
    own validation data (`prompt_from`). With it (task data): `val_ids` is the exact prompt, the tokens before the
    answer (`task_prompt`), and the line asks for `answer_length` tokens, greedily (`--temperature 0`)."""
    command = f"generate:   ltm generate --checkpoint {shlex.quote(str(checkpoint))}"
    if answer_length is not None:
        prompt = typable(val_ids)
        return command + f" --prompt {shell_quote(prompt)} --max-new-tokens {answer_length} --temperature 0"
    prompt = prompt_from(val_ids)
    return command + (f" --prompt {shlex.quote(prompt)}" if prompt else "")


def task_prompt(input_ids: Sequence[int], labels: Sequence[int]) -> Optional[tuple[list[int], int]]:
    """(prompt ids, answer length) of a task sample's (input_ids, labels) pair, or None when no label is scored.

    Labels are next-token labels (labels[j] is input_ids[j + 1]); the answer is the first run of scored labels
    (not IGNORE_INDEX): from position j on, so the prompt is input_ids[:j + 1] (BOS first). passkey: the key's
    digits; babi_facts: the room; mqar: the first query's value (one token)."""
    labels = [int(i) for i in labels]
    scored = [j for j, label in enumerate(labels) if label != IGNORE_INDEX]
    if not scored:
        return None
    first = scored[0]
    end = first
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return [int(i) for i in input_ids[:first + 1]], end - first


def typable(ids: Iterable[int]) -> bytes:
    """The bytes of a prompt that `ltm generate --prompt` can receive: `ltm generate` puts BOS in front itself,
    and a special token (BOS, EOS, PAD: ids >= 256) or a NUL byte cannot be typed (nor passed as an argument), so
    the prompt starts after the last of them."""
    ids = [int(i) for i in ids]
    cut = max((j for j, i in enumerate(ids) if i >= 256 or i == 0), default=-1)
    return bytes(ids[cut + 1:])


_ESCAPES = {0x5C: "\\\\", 0x27: "\\'", 0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r", 0x1B: "\\e"}


def shell_quote(data: bytes) -> str:
    """`data` as one bash word that is exactly those bytes: `shlex.quote` of printable ASCII, else `$'...'` with
    `\\n`, `\\t`, `\\'`, `\\\\` and `\\xHH` for every other byte outside printable ASCII (locale-independent)."""
    if all(0x20 <= b < 0x7F for b in data):
        return shlex.quote(data.decode("ascii"))
    return "$'" + "".join(_ESCAPES.get(b) or (chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}") for b in data) + "'"
