"""Kill a training run at random moments and inside its checkpoint saves, resume it each time, and compare the end with
an uninterrupted run (tests/test_reliability.py, docs/reliability.md).

Runs are forked from a zygote (tests/zygote.py) that imported the training stack and composed the config once, so a
restart costs the run's own start-up (about a second), not the imports. Saves announce their phases and pause there
(LTM_SAVE_HOOK_PAUSE, ltm_core.run_guard.save_hook): a kill "inside a save" waits for the k-th announcement and
sends SIGKILL during its pause.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
HOOK_PAUSE = 0.05  # seconds each save phase pauses in the kill runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Zygote:
    """The client side of tests/zygote.py."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "zygote.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def _ask(self, request: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def start(self, kind: str, args: list[str], log: Path, env: Optional[dict] = None) -> int:
        """kind "start": `ltm ARGS`; kind "train": train(compose(ARGS)). Returns the pid."""
        reply = self._ask({kind: list(args), "log": str(log), "env": env or {}})
        assert "pid" in reply, reply["error"]
        return reply["pid"]

    def poll(self, pid: int) -> Optional[int]:
        return self._ask({"poll": pid})["status"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["status"]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@dataclass
class Run:
    """One start of a (possibly multi-process) run: a pid and a log per rank."""

    zygote: Zygote
    pids: list[int]
    logs: list[Path]
    status: dict[int, int] = field(default_factory=dict)

    @classmethod
    def start(cls, zygote: Zygote, kind: str, args: list[str], log: Path, ranks: int = 1,
              env: Optional[dict] = None) -> "Run":
        envs = [dict(env or {})]
        if ranks > 1:  # as torchrun starts them: one process per rank with the rendezvous in the environment
            port = str(free_port())
            envs = [{**(env or {}), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
                     "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
                    for r in range(ranks)]
        logs = [log.with_name(f"{log.stem}.rank{r}{log.suffix}") if ranks > 1 else log for r in range(ranks)]
        pids = [zygote.start(kind, args, lg, e) for lg, e in zip(logs, envs)]
        return cls(zygote, pids, logs)

    def finished(self) -> bool:
        for pid in self.pids:
            if pid not in self.status:
                code = self.zygote.poll(pid)
                if code is not None:
                    self.status[pid] = code
        return len(self.status) == len(self.pids)

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        while not self.finished():
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"run did not finish in {timeout} s: {self.text()[-3000:]}")
            time.sleep(0.02)
        return [self.status[p] for p in self.pids]

    def signal(self, signum: int, group: bool = False) -> None:
        for pid in self.pids:
            if pid not in self.status:
                try:
                    (os.killpg if group else os.kill)(pid, signum)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL, group=True)
        for pid in self.pids:
            if pid not in self.status:
                self.status[pid] = self.zygote.wait(pid)

    def text(self) -> str:
        return "\n".join(lg.read_text(errors="replace") for lg in self.logs if lg.exists())

    def hook_lines(self) -> list[str]:
        return [ln for ln in self.text().splitlines() if ln.startswith("ltm-save-hook ")]


def checkpoint_step(out: Path) -> int:
    """The step of OUTPUT_DIR/checkpoints/last.ckpt (-1: none yet); raises if the file is not a whole checkpoint."""
    from ltm_core.checkpoint import read_checkpoint

    last = out / "checkpoints" / "last.ckpt"
    return int(read_checkpoint(last)["global_step"]) if last.exists() else -1


def losses(out: Path) -> list[str]:
    """The train/loss column of metrics.csv, as written (a lost or repeated step shows up here)."""
    with open(out / "metrics.csv", newline="") as f:
        return [r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")]


@dataclass
class Soak:
    kills: int = 0
    in_save: collections.Counter = field(default_factory=collections.Counter)  # kills inside a save, by phase
    restarts: int = 0
    max_checkpoint_step: int = -1


def soak(zygote: Zygote, args: list[str], out: Path, kills: int, seed: int, ranks: int = 1,
         max_saves: int = 2) -> Soak:
    """Start `train(compose(args + output_dir, resume=auto))`, SIGKILL it `kills` times, then let it finish. Each
    start draws its moment from the run's own progress, not from the clock (so the schedule does not depend on the
    machine's speed): after 0..max_saves saves completed (last.ckpt written), either at the 1st-3rd announcement of
    the next save's phases (inside it), or a random fraction of a second later (inside a step, a validation or the
    next save), or during start-up (reading the checkpoint, building the model). After every kill the newest
    checkpoint must read as a whole and never go back to an older step."""
    rng = random.Random(seed)
    result = Soak()
    args = [*args, f"output_dir={out}", "resume=auto"]
    env = {"LTM_SAVE_HOOK_PAUSE": str(HOOK_PAUSE)}
    while result.kills < kills:
        run = Run.start(zygote, "train", args, out.parent / f"{out.name}-{result.restarts}.log", ranks, env)
        result.restarts += 1
        moment = rng.choices(["save", "after", "startup"], weights=[5, 4, 1])[0]
        saves, j = rng.randint(0, max_saves), rng.randint(1, 3)
        delay = rng.uniform(0, 0.4) if moment == "after" else rng.uniform(0, 0.8)
        deadline = time.monotonic() + delay if moment == "startup" else None
        phase = None
        while not run.finished():
            if deadline is None:
                hooks = run.hook_lines()
                done = [i for i, h in enumerate(hooks) if h.split()[1] == "written" and h.endswith("last.ckpt")]
                if len(done) >= saves:
                    later = hooks[done[saves - 1] + 1:] if saves else hooks
                    if moment == "after":
                        deadline = time.monotonic() + delay
                    elif len(later) >= j:
                        phase = later[j - 1].split()[1]
                        break
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(0.002)
        if run.finished():
            assert all(c == 0 for c in run.wait()), run.text()[-3000:]
            raise AssertionError(f"the run ended after {result.kills} kills; give it more steps")
        run.kill()
        result.kills += 1
        if phase:
            result.in_save[phase] += 1
        step = checkpoint_step(out)  # the previous good checkpoint survives the kill
        assert step >= result.max_checkpoint_step, (step, result.max_checkpoint_step)
        result.max_checkpoint_step = step
    run = Run.start(zygote, "train", args, out.parent / f"{out.name}-final.log", ranks)
    codes = run.wait()
    assert codes == [0] * ranks, run.text()[-3000:]
    return result
