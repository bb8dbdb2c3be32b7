"""The runnable example under examples/, run as a user runs it (with tiny settings)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from support import TINY

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_train_and_deploy_example(tmp_path, monkeypatch, capsys):
    tiny_model = [o for o in TINY if o.startswith("model.")]
    monkeypatch.setattr(sys, "argv", ["train_and_deploy.py", "--out", str(tmp_path), "--steps", "4",
                                      "--samples", "16", *tiny_model])
    runpy.run_path(str(EXAMPLES / "train_and_deploy.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "generated: In the beginning" in out and "nf4 generated: In the beginning" in out
    assert "transformers == ltm: True" in out
    for folder in ("run/checkpoints/last.ckpt", "run/metrics.csv", "nf4/config.json", "hf/modeling_ltm.py"):
        assert (tmp_path / folder).exists(), folder


def test_readme_python_api_snippet(tmp_path, monkeypatch):
    """The README's Python API block as written, its Trainer run shortened (2 steps on a small text file): a model
    continued from its state gives the one call's logits, and the Trainer trains the model the engine left in eval
    mode."""
    import re

    import torch

    text = (EXAMPLES.parent / "README.md").read_text()
    block = re.search(r"## Python API\n+```python\n(.*?)```", text, re.S).group(1)
    assert "max_steps=200" in block and '"notes.txt"' in block
    block = block.replace("max_steps=200", "max_steps=2")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("In the beginning God created the heaven and the earth. " * 200)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    out, a, b = namespace["out"], namespace["a"], namespace["b"]
    torch.testing.assert_close(torch.cat([a.logits, b.logits], dim=1), out.logits, rtol=0, atol=1e-5)
    assert namespace["tokens"].shape == (1, 108)
    assert (tmp_path / "runs" / "py" / "checkpoints" / "last.ckpt").is_file()
    assert namespace["model"].training  # the Trainer trained it in training mode
