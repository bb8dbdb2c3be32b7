"""A process that imports the `ltm` CLI and the training stack once, then forks a fresh process for each command it is
given: `ltm train` runs that start in milliseconds instead of the seconds the imports take, so a test can kill and
restart a run many times (tests/test_reliability.py). The forked process runs `ltm_cli.app.main()` with the given
arguments and environment, exactly as the `ltm` console script does, in a session of its own (so a signal can go to
its whole process group, as a terminal's Ctrl-C does).

Protocol, one JSON object per line: stdin {"start": [args], "env": {...}, "log": path} -> stdout {"pid": N};
{"train": [overrides], "env": ..., "log": ...} -> {"pid": N}: the same below the CLI, `ltm_core.train.train(cfg)` with
the config composed once in the zygote (Hydra's composition takes seconds; the kill tests restart a run many times);
{"wait": pid} -> {"status": exit code (negative: killed by that signal)}; {"poll": pid} -> the same without waiting
({"status": null} while it runs); {"exit": true} ends the zygote.
Nothing here has run a torch operation before forking (no thread pools to inherit).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

import lightning  # noqa: E402,F401  (imported once, before any fork)
import torch  # noqa: E402,F401

import ltm_cli.app  # noqa: E402
import ltm_core.lit  # noqa: E402,F401
import ltm_core.parallel.trainer  # noqa: E402,F401
import ltm_core.train  # noqa: E402,F401


CONFIGS: dict[tuple[str, ...], object] = {}


def _config(overrides: list[str]):
    from ltm_core.configuration import compose

    key = tuple(overrides)
    if key not in CONFIGS:
        CONFIGS[key] = compose(overrides)
    return CONFIGS[key]


def _train(cfg) -> None:
    """What the CLI's `train` does below the parsing, with its one-line error report."""
    from ltm_cli.errors import report
    from ltm_core.errors import LtmError, RunStopped
    from ltm_core.run_guard import is_rank_zero
    from ltm_core.train import train

    try:
        train(cfg)
    except LtmError as err:
        if not isinstance(err, RunStopped) or is_rank_zero():
            report(err)
        raise SystemExit(err.exit_code) from None


def _child(request: dict) -> None:
    os.setsid()
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(request.get("env", {}))
    code = 0
    try:
        if "train" in request:
            _train(_config(request["train"]))
        else:
            sys.argv = ["ltm", *request["start"]]
            ltm_cli.app.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # a traceback is a failure the test reports (it reads the log)
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if "start" in request or "train" in request:
            if "train" in request:
                try:
                    _config(request["train"])  # composed here, once: every forked run inherits it
                except Exception as exc:  # noqa: BLE001 - reported to the test
                    print(json.dumps({"error": str(exc)}), flush=True)
                    continue
            pid = os.fork()
            if pid == 0:
                _child(request)
            reply = {"pid": pid}
        elif "wait" in request or "poll" in request:
            pid = int(request.get("wait", request.get("poll")))
            done, status = os.waitpid(pid, 0 if "wait" in request else os.WNOHANG)
            reply = {"status": os.waitstatus_to_exitcode(status) if done else None}
        else:
            break
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
