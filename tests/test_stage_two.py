"""Stage-2 recipes (`continues: NAME`: experiment=passkey_long, mqar_long and their _baseline twins) start from a
checkpoint of their stage 1: without one, or with a checkpoint trained on another task or with(out) memory, `ltm
train` stops with one line before writing anything; continues=null trains from scratch; an interrupted stage 2
resumes with resume=auto (ltm_core.train.check_continues)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support import invoke, one_error_line
from ltm_core.checkpoint import read_checkpoint
from ltm_core.configuration import compose
from ltm_core.errors import CheckpointError, ConfigError
from ltm_core.train import check_continues, train

# a few seconds per run on one thread: one layer, two samples a batch, no wall-clock saves
SMALL = ["model.num_hidden_layers=1", "data.batch_size=2", "data.val_samples=4", "trainer.val_check_interval=5",
         "trainer.log_every_n_steps=1", "trainer.progress=false", "trainer.accelerator=cpu",
         "trainer.checkpoint_every_minutes=0"]
STAGES = {"passkey_long": "passkey", "passkey_long_baseline": "passkey_baseline", "mqar_long": "mqar",
          "mqar_long_baseline": "mqar_baseline"}


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory) -> Path:
    """A 3-step run of experiment=passkey: its last.ckpt."""
    run = tmp_path_factory.mktemp("stage-one") / "run"
    result = invoke("train", "experiment=passkey", *SMALL, "trainer.max_steps=3", f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    return run / "checkpoints" / "last.ckpt"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("recipe", sorted(STAGES))
def test_a_stage_two_recipe_without_resume_stops_before_writing(recipe, tmp_path):
    out = tmp_path / "run_long"
    result = invoke("train", f"experiment={recipe}", *SMALL, "trainer.max_steps=2", f"output_dir={out}")
    one_error_line(result, f"config error: resume: experiment={recipe} continues a run of "
                           f"experiment={STAGES[recipe]}: add "
                           f"resume=RUN/checkpoints/last.ckpt (made by ltm train experiment={STAGES[recipe]} "
                           "output_dir=RUN), or continues=null to train it from scratch")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_resume_auto_without_a_checkpoint_stops_and_leaves_the_folder_as_it_was(tmp_path):
    """A stage 2 killed before its first save left config.yaml only: resume=auto has nothing to continue."""
    out = tmp_path / "run_long"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 1\n")
    before = _files(out)
    result = invoke("train", "experiment=mqar_long", *SMALL, "trainer.max_steps=2", "resume=auto", f"output_dir={out}")
    one_error_line(result, "experiment=mqar_long continues a run of experiment=mqar, and resume=auto finds no "
                           f"checkpoint in {out / 'checkpoints'}: give resume=RUN/checkpoints/last.ckpt (made by "
                           "ltm train experiment=mqar output_dir=RUN) with overwrite=true, or continues=null")
    assert _files(out) == before
    fresh = tmp_path / "fresh"
    one_error_line(invoke("train", "experiment=mqar_long", *SMALL, "trainer.max_steps=2", "resume=auto",
                          f"output_dir={fresh}"),
                   "resume=auto finds no checkpoint")
    assert not fresh.exists()


@pytest.mark.parametrize("recipe,trained,continues", [
    ("mqar_long", "passkey with the tokens memory", "experiment=mqar (trained on mqar with the tokens memory)"),
    ("passkey_long_baseline", "passkey with the tokens memory",
     "experiment=passkey_baseline (trained on passkey without memory)")])
def test_a_checkpoint_of_another_task_or_memory_is_refused(recipe, trained, continues, stage_one, tmp_path):
    out = tmp_path / "run_long"
    result = invoke("train", f"experiment={recipe}", *SMALL, f"resume={stage_one}", f"output_dir={out}")
    one_error_line(result, f"checkpoint error: resume={stage_one} was trained on {trained}, but experiment={recipe} "
                           f"continues a run of {continues}: resume from a checkpoint made by ltm train "
                           f"{continues.split(' ')[0]}, or add continues=null to resume from this one anyway")
    assert not out.exists()


def test_stage_one_then_stage_two_then_its_interrupted_run_resumes(stage_one, tmp_path):
    out = tmp_path / "run_long"
    result = invoke("train", "experiment=passkey_long", *SMALL, "trainer.max_steps=5", f"resume={stage_one}",
                    f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {stage_one}" in result.stdout.replace("\n", "")  # (the console wraps long paths)
    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    config = ckpt["hyper_parameters"]["config"]
    assert ckpt["global_step"] == 5 and config["continues"] == "passkey" and config["data"]["seq_len"] == 192
    # stopped at step 5 of 7 (as an interrupted run): resume=auto continues it from its own last.ckpt
    result = invoke("train", "experiment=passkey_long", *SMALL, "trainer.max_steps=7", "resume=auto",
                    f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {out / 'checkpoints' / 'last.ckpt'}" in result.stdout.replace("\n", "")
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 7


def test_continues_null_trains_a_stage_two_recipe_from_scratch(tmp_path):
    out = tmp_path / "scratch"
    result = invoke("train", "experiment=mqar_long_baseline", "continues=null", *SMALL, "trainer.max_steps=2",
                    f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from" not in result.stdout
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_the_python_api_is_checked_too(tmp_path):
    out = tmp_path / "run_long"
    with pytest.raises(ConfigError, match=r"^config error: resume: this run continues a run of "
                                          r"experiment=passkey: add resume="):
        train(compose(["experiment=passkey_long", *SMALL, "trainer.max_steps=2", f"output_dir={out}"]))
    assert not out.exists()


def _copy(stage_one: Path, folder: Path, change) -> Path:
    """stage_one's checkpoint in folder/checkpoints/, its stored config changed by `change`."""
    ckpt = torch.load(stage_one, map_location="cpu", weights_only=True)
    change(ckpt["hyper_parameters"]["config"])
    path = folder / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    return path


def test_what_a_checkpoint_was_trained_on_comes_from_its_run_config(stage_one, tmp_path):
    def check(path: Path, recipe: str = "passkey_long") -> None:
        check_continues(compose([f"experiment={recipe}", f"resume={path}", f"output_dir={tmp_path / 'out'}"]))

    baseline = _copy(stage_one, tmp_path / "baseline", lambda c: c["model"].update(use_memory=False))
    with pytest.raises(CheckpointError, match=r"was trained on passkey without memory, but this run continues a run "
                                              r"of experiment=passkey \(trained on passkey with the tokens memory\)"):
        check(baseline)  # a baseline's checkpoint for the memory model
    check(baseline, "passkey_long_baseline")
    mqar = _copy(stage_one, tmp_path / "mqar", lambda c: c["data"].update(name="mqar"))
    with pytest.raises(CheckpointError, match="was trained on mqar with the tokens memory"):
        check(mqar)
    check(mqar, "mqar_long")
    blind = _copy(stage_one, tmp_path / "blind", lambda c: c.pop("data"))
    with pytest.raises(CheckpointError, match="has no data config"):
        check(blind)  # damaged: one line before anything is written, not deep inside the resume


def _mapped(path: Path) -> bool:
    """Whether `path` is mapped into this process (Linux)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_the_check_maps_the_checkpoint_instead_of_reading_it(stage_one, tmp_path, monkeypatch):
    """Every rank of a stage 2 checks the stage-1 checkpoint: its tensors are mapped from the file (only the config is
    read), the same dict as read whole, and a file in torch's legacy (non-zip) format is read whole as before."""
    copy = tmp_path / "mapped.ckpt"
    copy.write_bytes(stage_one.read_bytes())
    whole, mapped = read_checkpoint(copy), read_checkpoint(copy, mmap=True)
    assert _mapped(copy) and mapped.keys() == whole.keys()
    assert all(torch.equal(mapped["state_dict"][k], v) for k, v in whole["state_dict"].items())
    del mapped
    legacy = tmp_path / "legacy.ckpt"
    torch.save(whole, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(legacy, mmap=True)["state_dict"]["model.embed_tokens.weight"],
                       whole["state_dict"]["model.embed_tokens.weight"]) and not _mapped(legacy)

    loads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("mmap")) or load(*a, **kw))
    check_continues(compose(["experiment=passkey_long", f"resume={copy}", f"output_dir={tmp_path / 'out'}"]))
    assert loads == [True]
