"""`ltm`: train, generate and evaluate Long-Term-Memory Transformers.

Each command is a thin layer over a library function (ltm_core.train.train, InferenceEngine,
ltm_core.evaluate.evaluate, ltm_core.quantize.quantize_checkpoint, ltm_core.export.export_checkpoint). Errors caused by input print one line and exit with code 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from ltm_cli.bench import bench_app
from ltm_cli.deploy import export_cmd, quantize_cmd
from ltm_cli.errors import (check_overrides, device_option, file_name, output_file, report, settings,
                            usage_errors_in_one_line, user_errors, write_json)
from ltm_cli.help import groups_epilog
from ltm_core.errors import ConfigError, Interrupted, LtmError, RunStopped

usage_errors_in_one_line()
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Long-Term-Memory Transformers: train, generate, evaluate, quantize, benchmark, export.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect the composed Hydra config.")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.command("quantize", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(quantize_cmd)
app.command("export")(export_cmd)
console = Console()
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
GROUPS = groups_epilog()  # read from conf/ (a few milliseconds)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")):
    settings["debug"] = debug


def _keys(overrides: list[str]) -> set[str]:
    from ltm_core.configuration import override_key

    return {override_key(o) for o in overrides}


# ---------------------------------------------------------------------------------------------------- train
@app.command(context_settings=OVERRIDES, options_metavar="[OPTIONS] [OVERRIDES]...", epilog=GROUPS)
@user_errors
def train(ctx: typer.Context,
          multirun: bool = typer.Option(False, "-m", "--multirun", help="Hydra sweep: one job per combination.")):
    """Train a model. Arguments are Hydra overrides: `ltm train model=small trainer.max_steps=100 output_dir=runs/a`.

    With no arguments: a tiny memory model on the King James Bible (about a minute on a CPU).
    """
    from ltm_core.configuration import job_name, override_key, validate_overrides

    overrides = list(ctx.args)
    # every job's config and input files are checked before torch and Lightning load, and before any job starts
    swept = validate_overrides(overrides, multirun)

    import hydra
    from hydra.core.hydra_config import HydraConfig

    from ltm_core.run_guard import is_rank_zero
    from ltm_core.train import check_output_dir, default_output_dir, train as train_run

    given = {override_key(o): o.split("=", 1)[1] for o in overrides if "=" in o}
    if multirun:
        folder = given.get("output_dir") or default_output_dir().replace("outputs/", "multirun/", 1)
        overrides.append(f"hydra.sweep.dir={folder}")
    else:
        folder = given.get("output_dir") or default_output_dir()
        if "output_dir" not in given:
            overrides.append(f"output_dir={folder}")
    # before Hydra makes the folder: a file in its place, or a place that cannot hold one (Hydra resolves ${...})
    if is_rank_zero() and "${" not in folder:
        check_output_dir(folder)
    theirs = not multirun and Path(folder).exists()  # the user's folder: never removed, even when a run leaves it empty
    jobs: list[int] = []  # a sweep's jobs that ran to their end
    failed: list[tuple[int, str, int]] = []  # and those that failed: number, the first clause of the error, exit code

    def job_failed(err: BaseException, code: int) -> None:
        """A sweep job's failure: one line naming the job, and the sweep goes on (an interrupt stops it instead)."""
        hydra_cfg = HydraConfig.get()
        num = int(hydra_cfg.job.num)
        if isinstance(err, LtmError):
            text = str(err)
        elif isinstance(err, SystemExit):  # a launched multi-process run: its worker printed the error
            text = f"a training process stopped with exit code {code} (its line is above)"
        else:  # no bad input but a bug, whose traceback a report needs
            import traceback

            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
            text = f"{type(err).__name__}: {err}"
        failed.append((num, text.split("; ")[0], code))
        if not isinstance(err, RunStopped) or is_rank_zero():  # all ranks of a run stop together: one line
            report(LtmError(f"{job_name(num, hydra_cfg.overrides.task, swept)}: {text}"))

    @hydra.main(version_base="1.3", config_path="pkg://ltm_conf", config_name="train")
    def task(cfg) -> None:
        cfg.output_dir = HydraConfig.get().runtime.output_dir  # a sweep job's own folder
        try:
            job(cfg)
        finally:  # however the job ended (bad input, a bug, a signal), an empty folder Hydra made for it goes
            out = Path(cfg.output_dir)
            if not theirs and out.is_dir() and not any(out.iterdir()):
                out.rmdir()

    def job(cfg) -> None:
        try:
            train_run(cfg)
            if multirun:
                jobs.append(int(HydraConfig.get().job.num))
        except (LtmError, KeyboardInterrupt) as err:  # Hydra catches Exceptions but lets SystemExit through
            if settings["debug"]:
                raise
            if isinstance(err, KeyboardInterrupt):  # before training started (from then on SIGINT saves and stops)
                err = Interrupted("interrupted before training started; nothing to save", 2)
            if multirun and not isinstance(err, Interrupted):  # Ctrl-C stops the sweep; a job's own error does not
                return job_failed(err, err.exit_code)
            if not isinstance(err, RunStopped) or is_rank_zero():  # all ranks of a run stop together: one line
                report(err)
            sys.exit(err.exit_code)
        except SystemExit as exc:  # a launched multi-process run: its workers failed (and printed why), or a signal
            code = exc.code if isinstance(exc.code, int) else 1
            if not multirun or settings["debug"] or code == 0 or code >= 128:
                raise
            job_failed(exc, code)
        except Exception as exc:  # a bug in one job of a sweep: its traceback, and the other jobs still run
            if not multirun or settings["debug"]:
                raise
            job_failed(exc, 1)

    argv = sys.argv
    sys.argv = [argv[0]] + (["-m"] if multirun else []) + overrides
    try:
        task()
    finally:
        sys.argv = argv
    if multirun:  # one line for the sweep: how many jobs, which failed and why
        from rich.markup import escape

        from ltm_cli.errors import err_console

        total = len(jobs) + len(failed)
        line = f"{total} job{'s' if total != 1 else ''}: {len(jobs)} done"
        if failed:
            why = "; ".join(f"job {num}: {first}" for num, first, _ in failed)
            line = f"{line}, {len(failed)} failed ({why})"
        if is_rank_zero():  # (the ranks of an external launch each run the sweep)
            (err_console if failed else console).print(escape(line), highlight=False, soft_wrap=True)
        if failed:  # 2: bad input or a run that stopped; 1: a bug
            raise typer.Exit(1 if any(code == 1 for *_, code in failed) else 2)


# ------------------------------------------------------------------------------------------------- generate
QUANTIZE_HELP = "Quantize on load: bnb.int8 | bnb.nf4 | bnb.nf4-dq | bnb.fp4 | bnb.fp4-dq (see `ltm quantize`)."


def _load(checkpoint: Path, device: str, quantize: Optional[str], overrides: list[str] = (), ckpt=None):
    """The checkpoint's model, quantized on the fly with `--quantize` (the method is checked before loading)."""
    from ltm_core.checkpoint import load_model

    if quantize is None:
        return load_model(checkpoint, overrides, device=device, ckpt=ckpt)
    from ltm_core.quantize import check_method, quantize_model

    check_method(quantize, "--quantize")
    model = load_model(checkpoint, overrides, device=device, ckpt=ckpt)
    quantize_model(model, quantize)
    return model


SAMPLING_OPTIONS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed"}
PROMPT_HELP = ("Text to continue. `-p -` reads the prompt from stdin: its bytes exactly, a trailing newline "
               "included (`printf %s ... |` or `echo -n` leaves it out).")


@app.command()
@user_errors
def generate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A .ckpt written by `ltm train` (or a folder "
                                    "written by `ltm export --format safetensors|hf` or `ltm quantize`)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help=PROMPT_HELP),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from this file: its "
                                               "bytes exactly, a trailing newline included (`-`: stdin). For prompts "
                                               "longer than a command line takes (about 128 KB)."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n", help="Tokens (bytes) to generate: 0 prints "
                                       "the prompt only; any larger number streams in constant memory."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", min=0.0, help="0 = greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Sample from the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold, in (0, 1]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed for reproducible output."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
):
    """Stream text from a checkpoint: the prompt, then its continuation. Memory per token stays flat however long
    the output.

    The prompt: `--prompt TEXT`, `--prompt -` (stdin) or `--prompt-file PATH`; none: generate from the start of a
    text. Piped stdin is read only with `-p -` (without, a note on stderr says it was not read)."""
    import torch

    from ltm_core.inference import InferenceEngine
    from ltm_core.tokenizer import BOS, ByteTokenizer

    if max_new_tokens < 0:
        raise ConfigError("--max-new-tokens", f"must be 0 or more, got {max_new_tokens}")
    sampling = _sampling_config(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    dev = device_option(device)
    tokenizer = ByteTokenizer()
    data = _prompt_bytes(prompt, prompt_file)  # None: the literal --prompt text (or none)
    model = _load(checkpoint, dev, quantize)
    if prompt is None and prompt_file is None and _stdin_holds_input():
        _note("stdin was not read (generating from the start of a text): pass `-p -` to make it the prompt")
    elif data == b"":
        _note(f"the prompt from {'stdin' if '-' in (prompt, str(prompt_file)) else prompt_file} is empty: "
              "generating from the start of a text")
    engine = InferenceEngine(model, sampling)
    # any text: bytes that are not UTF-8 (in --prompt: as surrogates) are kept as bytes
    ids = tokenizer.encode(prompt or "", bos=True) if data is None else [BOS, *data]
    input_ids = torch.tensor([ids], device=dev)
    decode = tokenizer.stream_decoder()
    sys.stdout.reconfigure(errors="replace")  # what the terminal's encoding cannot show prints as "?", never a crash
    sys.stdout.write(tokenizer.decode(ids))  # invalid UTF-8 prints as U+FFFD, as in the generated text
    for token in engine.stream(input_ids, max_new_tokens):
        sys.stdout.write(decode(int(token[0])))
        sys.stdout.flush()
    sys.stdout.write(decode(None) + "\n")  # an unfinished last character still prints (as U+FFFD)


def _sampling_config(**values):
    """InferenceConfig(**values), its errors naming the option (`--top-p`), not the library's field (top_p)."""
    from ltm_core.inference import InferenceConfig

    try:
        return InferenceConfig(**values)
    except ConfigError as err:  # InferenceConfigError("top_p", ...)
        if err.key not in SAMPLING_OPTIONS:
            raise
        raise ConfigError(SAMPLING_OPTIONS[err.key], err.detail) from None


def _prompt_bytes(prompt: Optional[str], prompt_file: Optional[Path]) -> Optional[bytes]:
    """The prompt's bytes when it is read (`-p -` or --prompt-file: exactly, nothing stripped); None for a literal
    --prompt or none. Both options at once is an error; so is a prompt file that cannot be read."""
    if prompt is not None and prompt_file is not None:
        raise ConfigError("--prompt-file", "give the prompt once: --prompt TEXT, --prompt - (stdin) or --prompt-file "
                                           "PATH, not --prompt and --prompt-file together")
    if prompt == "-" or prompt_file is not None and str(prompt_file) == "-":
        return _read_stdin("--prompt" if prompt == "-" else "--prompt-file")
    if prompt_file is None:
        return None
    if prompt_file.is_dir():
        raise ConfigError("--prompt-file", f"{prompt_file} is a folder: give a file")
    if not prompt_file.exists():
        raise ConfigError("--prompt-file", f"{prompt_file} does not exist")
    try:
        return prompt_file.read_bytes()
    except OSError as exc:
        raise ConfigError("--prompt-file", f"{prompt_file} cannot be read ({exc.strerror or exc})") from None


def _read_stdin(option: str) -> bytes:
    """All of stdin, as bytes (a terminal: until Ctrl-D, after a note saying so)."""
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    if stream is None:
        raise ConfigError(option, "- reads the prompt from stdin, which is closed")
    try:
        if sys.stdin.isatty():
            _note("reading the prompt from the terminal until end of input (Ctrl-D)")
        data = stream.read()
    except (OSError, ValueError) as exc:
        raise ConfigError(option, f"- could not read stdin ({getattr(exc, 'strerror', None) or exc})") from None
    return data if isinstance(data, bytes) else data.encode("utf-8", errors="surrogateescape")


def _stdin_holds_input() -> bool:
    """Whether stdin is a pipe, or a non-empty file redirected in (`< notes.txt`): input a user meant to give. A
    terminal, /dev/null or no stdin at all is not."""
    import os
    import stat

    try:
        mode = os.fstat(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):  # none, closed, or not a file (a test runner's buffer)
        return False
    return stat.S_ISFIFO(mode.st_mode) or stat.S_ISSOCK(mode.st_mode) or (stat.S_ISREG(mode.st_mode)
                                                                          and mode.st_size > 0)


def _note(text: str) -> None:
    """One line on stderr that is no error: what the command did with an input the user may have meant."""
    from ltm_cli.errors import err_console
    from rich.markup import escape

    err_console.print(f"note: {escape(text)}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------------- eval
@app.command("eval", context_settings=OVERRIDES)
@user_errors
def evaluate_cmd(
    ctx: typer.Context,
    checkpoints: List[Path] = typer.Option(..., "--checkpoint", "-c", help="A .ckpt written by `ltm train`; "
                                           "repeat it with --by-position to compare runs on one table and plot."),
    by_position: bool = typer.Option(False, "--by-position", help="The validation loss per token-position bin "
                                     "inside the sample (the first segments finer, then one bin per segment)."),
    json_path: Optional[Path] = typer.Option(None, "--json", parser=file_name,
                                             help="Also write the results to this JSON file."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", parser=file_name, help="Task evaluation or "
                                             "--by-position: also draw the results to this image (needs the `plot` "
                                             "extra)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
):
    """Validation loss, perplexity and bits-per-byte. Overrides: `data=...`, `data.seq_len=N` (default: the
    checkpoint's data and training length).

    `--by-position`: the loss per token-position bin, one column per `--checkpoint` (evaluated on the same windows).

    Long-context tasks: `task=passkey|mqar|babi_facts` with `task.lengths=[...]`, `task.samples=N`, ... (a
    checkpoint trained on a task is evaluated on it by default); lengths default to 1x, 4x, 16x, 64x the
    training length."""
    from ltm_core.checkpoint import checkpoint_config, read_checkpoint
    from ltm_core.evaluate import eval_data, evaluate
    from ltm_core.tasks import is_task

    overrides = list(ctx.args)
    check_overrides(overrides, ("data", "model", "task"), "eval")
    dev = device_option(device)
    if len(checkpoints) > 1 and not by_position:
        raise ConfigError("--checkpoint", "several checkpoints are compared with --by-position; give one otherwise")
    output_file(json_path, "--json")
    output_file(plot_path, "--plot")
    ckpts = [read_checkpoint(path) for path in checkpoints]
    stored = [checkpoint_config(ckpt) for ckpt in ckpts]
    task = any(k.split(".")[0] == "task" for k in _keys(overrides))
    text = dict(o.lstrip("+~").split("=", 1) for o in overrides).get("data")  # data=NAME: that text, even for a
    if text is not None and is_task(text):  # checkpoint trained on a task
        raise ConfigError("data", f"{text} is a task: evaluate it with task={text}")
    if by_position:
        if task:
            raise ConfigError("--by-position", "measures the loss on text (data=kjv|pystdlib|textfile), not on a task")
        models = [_load(path, dev, quantize, overrides, ckpt) for path, ckpt in zip(checkpoints, ckpts)]
        _evaluate_by_position(checkpoints, models, stored, overrides, json_path, plot_path)
        return
    checkpoint, stored = checkpoints[0], stored[0]
    model = _load(checkpoint, dev, quantize, overrides, ckpts[0])
    if task or (is_task(stored["data"]["name"]) and text is None):
        _evaluate_task(checkpoint, model, stored, overrides, json_path, plot_path)
        return
    if plot_path is not None:
        raise ConfigError("--plot", "draws task results (task=passkey|mqar|babi_facts) or the loss by position "
                                    "(--by-position)")
    data = eval_data(stored, overrides, model.config.segment_length)
    from ltm_cli.progress import progress_bar

    with progress_bar("eval", "windows") as progress:
        results = evaluate(model, data, progress=progress)
    table = Table(title=f"ltm eval {checkpoint}")
    for column in ("data", "tokens", "loss", "perplexity", "bits/byte"):
        table.add_column(column, justify="right")
    table.add_row(data.name if data.name != "textfile" else str(data.path), f"{results['tokens']:,.0f}",
                  f"{results['loss']:.4f}", f"{results['perplexity']:.3f}", f"{results['bpb']:.4f}")
    console.print(table)
    if json_path is not None:
        write_json(json_path, {"checkpoint": str(checkpoint), "data": data.name, **results})


SAME_WINDOWS = ("name", "path", "seq_len", "val_books", "val_fraction", "val_samples")  # fix the windows read


def _evaluate_by_position(checkpoints: list[Path], models: list, stored: list[dict], overrides: list[str],
                          json_path: Optional[Path], plot_path: Optional[Path]) -> None:
    """`ltm eval --by-position`: ltm_core.evaluate.loss_by_position for every checkpoint, on the same validation
    windows, binned over the smallest segment length among them."""
    from ltm_core.data import load_corpus
    from ltm_core.evaluate import eval_data, loss_by_position

    datas = [eval_data(cfg, overrides, model.config.segment_length) for model, cfg in zip(models, stored)]
    for path, data in zip(checkpoints[1:], datas[1:]):
        differ = [k for k in SAME_WINDOWS if getattr(data, k) != getattr(datas[0], k)]
        if differ:
            k = differ[0]
            raise ConfigError(f"data.{k}", f"{path} was trained with {getattr(data, k)}, {checkpoints[0]} with "
                                              f"{getattr(datas[0], k)}: pass data.{k}=... to evaluate them on the same "
                                              "windows")
    corpus = load_corpus(datas[0])
    segment = min(model.config.segment_length for model in models)
    runs = []
    with console.status("loss by position") as status:
        for path, model, data in zip(checkpoints, models, datas):
            status.update(f"loss by position: {path}")
            runs.append({"checkpoint": str(path), "label": _run_label(path),
                         **loss_by_position(model, data, corpus, segment_length=segment)})
    data = datas[0]
    results = {"data": data.name, "path": data.path, "seq_len": data.seq_len, "windows": runs[0]["windows"],
               "bin_segment": segment, "model_overrides": [o for o in overrides if o.startswith("model.")],
               "runs": runs}
    console.print(_position_table(results))
    if json_path is not None:
        write_json(json_path, results)
    if plot_path is not None:
        from ltm_core.plotting import plot_loss_by_position

        plot_loss_by_position(results, plot_path)


def _run_label(path: Path) -> str:
    """A run's name: its output folder for RUN/checkpoints/x.ckpt, else the file name."""
    return path.parent.parent.name if path.parent.name == "checkpoints" and path.parent.parent.name else path.stem


def _position_table(results: dict) -> Table:
    where = results["data"] if results["path"] is None else results["path"]
    table = Table(title=f"ltm eval --by-position: bits/byte by token position ({where}, {results['seq_len']:,} "
                        f"tokens, {results['windows']} windows, segments of {results['bin_segment']})")
    table.add_column("tokens", justify="right")
    table.add_column("segment", justify="right")
    for run in results["runs"]:
        kind = run["memory"] or "no memory"
        table.add_column(f"{run['label']}\n{kind}, segment {run['segment_length']}", justify="right")
    for i, row in enumerate(results["runs"][0]["bins"]):
        table.add_row(f"{row['start']}-{row['end'] - 1}", str(row["segment"]),
                      *[f"{run['bins'][i]['bpb']:.4f}" for run in results["runs"]])
    table.add_row("all", "", *[f"{run['bpb']:.4f}" for run in results["runs"]], style="bold")
    return table


def _evaluate_task(checkpoint: Path, model, stored: dict, overrides: list[str], json_path: Optional[Path],
                   plot_path: Optional[Path]) -> None:
    """`ltm eval task=...`: the task grid, streamed segment by segment (ltm_core.tasks.evaluate)."""
    from ltm_cli.progress import progress_bar
    from ltm_core.tasks.evaluate import eval_task_config, evaluate_task
    from ltm_core.tasks.report import plot_results, results_table

    task_cfg = eval_task_config(stored, overrides)
    train_length = int(stored["data"]["seq_len"])
    with progress_bar(f"task={task_cfg.name}", "samples") as progress:
        results = evaluate_task(model, task_cfg, train_length, progress=progress)
    results = {"checkpoint": str(checkpoint), "model_overrides": [o for o in overrides if o.startswith("model.")],
               **results}
    console.print(results_table(results, title=f"ltm eval task={task_cfg.name} {checkpoint}"))
    if json_path is not None:
        write_json(json_path, results)
    if plot_path is not None:
        plot_results(results, plot_path)


# --------------------------------------------------------------------------------------------------- config
@config_app.command("show", context_settings=OVERRIDES, options_metavar="[OPTIONS] [OVERRIDES]...", epilog=GROUPS)
@user_errors
def config_show(ctx: typer.Context):
    """Print the config that `ltm train \\[overrides]` would use, its values checked as `ltm train` checks them (the
    data files, the devices and the machine are checked when a run starts).

    Example: `ltm config show model=small data=textfile data.path=notes.txt trainer.max_steps=100`.
    """
    from omegaconf import OmegaConf

    from ltm_core.configuration import compose

    if any(a in ("-m", "--multirun") for a in ctx.args):
        raise ConfigError("-m", "ltm config show shows one config: sweeps are for `ltm train -m` (show each "
                                "combination with its own `ltm config show`)")
    cfg = compose(list(ctx.args))
    console.print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", background_color="default"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
