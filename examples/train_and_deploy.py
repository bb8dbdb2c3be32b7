"""From Python: train a memory model with the Trainer API, generate with the memory cache, quantize it, and export it
for Hugging Face transformers.

    python examples/train_and_deploy.py --out runs/example                 # model=tiny, 300 steps: a few CPU minutes
    python examples/train_and_deploy.py --out /tmp/ex --steps 10 model.hidden_size=32 model.num_hidden_layers=1

Extra arguments are `model.*` overrides of the `model=tiny` preset (`ltm config show` lists them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ltm_core import InferenceConfig, InferenceEngine, TitanModel, Trainer, TrainingArguments
from ltm_core.checkpoint import load_model
from ltm_core.config import DataConfig
from ltm_core.configuration import compose, model_config
from ltm_core.data import load_corpus
from ltm_core.export import export_checkpoint
from ltm_core.quantize import quantize_checkpoint
from ltm_core.tokenizer import ByteTokenizer


class Windows(Dataset):
    """Windows of seq_len + 1 byte-token ids (inputs and next-token labels) taken evenly from a token array: any
    map-style Dataset of 1-D token-id tensors trains."""

    def __init__(self, tokens: np.ndarray, seq_len: int, count: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = int(self.starts[i])
        return torch.from_numpy(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for the run and its exports.")
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps.")
    parser.add_argument("--samples", type=int, default=4096, help="Training windows taken from the corpus.")
    args, overrides = parser.parse_known_args()

    # 1. a model, and datasets of token ids (here: windows of the KJV Bible, which ships with ltm)
    torch.manual_seed(0)
    model = TitanModel(model_config(compose(["model=tiny", *overrides])))
    seq_len = 4 * model.config.segment_length
    corpus = load_corpus(DataConfig(name="kjv", seq_len=seq_len))
    train, val = Windows(corpus.train, seq_len, args.samples), Windows(corpus.val, seq_len, 16)

    # 2. train: the Lightning run of `ltm train` (checkpoints, metrics.csv, resume with train(True))
    training = TrainingArguments(output_dir=str(args.out / "run"), learning_rate=3e-3, per_device_train_batch_size=8,
                                 gradient_accumulation_steps=1, max_steps=args.steps, warmup_steps=min(20, args.steps),
                                 eval_steps=max(1, args.steps // 2), logging_steps=10, progress_bar=False,
                                 overwrite_output_dir=True)
    last = Trainer(model=model, args=training, train_dataset=train, eval_dataset=val).train()

    # 3. generate: the memory cache carries the state, so each token costs the same however long the text
    tokenizer = ByteTokenizer()
    engine = InferenceEngine(load_model(last), InferenceConfig(use_memory_cache=True, max_sequence_length=256,
                                                               temperature=0.8, top_k=50, seed=0))
    prompt = torch.tensor([tokenizer.encode("In the beginning", bos=True)])
    print("generated:", tokenizer.decode(engine.generate(prompt, max_new_tokens=200)[0].tolist()))

    # 4. quantize (what `ltm quantize` runs): a safetensors folder that load_model / `ltm generate` read
    kjv = DataConfig(name="kjv", seq_len=seq_len, val_samples=8)
    report = quantize_checkpoint(last, "bnb.nf4", args.out / "nf4", kjv, gen_tokens=32, overwrite=True)
    base, nf4 = report["rows"]
    print(f"nf4: {nf4['disk_bytes']:,} bytes on disk vs {base['disk_bytes']:,}, bits/byte {nf4['bpb']:.3f} vs "
          f"{base['bpb']:.3f}")
    quantized = InferenceEngine(load_model(args.out / "nf4"), InferenceConfig(temperature=0))
    print("nf4 generated:", tokenizer.decode(quantized.generate(prompt, max_new_tokens=60)[0].tolist()))

    # 5. export for transformers (needs the hf extra): AutoModelForCausalLM + AutoTokenizer, the same tokens
    hf_dir = export_checkpoint(last, "hf", args.out / "hf", overwrite=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True)
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    ids = hf_tokenizer("In the beginning", return_tensors="pt").input_ids
    greedy = hf_model.generate(ids, do_sample=False, max_new_tokens=60)
    same = InferenceEngine(load_model(last), InferenceConfig(temperature=0)).generate(ids, 60)
    print("transformers generated:", hf_tokenizer.decode(greedy[0], skip_special_tokens=True))
    print("transformers == ltm:", torch.equal(greedy, same))


if __name__ == "__main__":
    main()
