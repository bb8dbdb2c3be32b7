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
