"""`ltm export`: safetensors folders load back as the checkpoint; the Hugging Face folder loads with transformers and
generates exactly the tokens of `ltm generate`; bad input exits 2 in one line and leaves no half-written folder."""

from __future__ import annotations

import json

import pytest
import torch

from support import invoke, one_error_line, run_ltm
from ltm_core.checkpoint import checkpoint_config, load_model, read_checkpoint
from ltm_core.errors import LtmError
from ltm_core.export import export_checkpoint
from ltm_core.export.safetensors import write_folder
from ltm_core.inference import InferenceConfig, InferenceEngine
from ltm_core.quantize import quantization_record, quantize_model
from ltm_core.tokenizer import ByteTokenizer

PROMPT = "In the beginning"


def _ids() -> torch.Tensor:
    return torch.tensor([ByteTokenizer().encode(PROMPT, bos=True)])


def test_safetensors_export_is_the_checkpoint_sharded(trained_tiny, tmp_path):
    out = export_checkpoint(trained_tiny, "safetensors", tmp_path / "st", max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert "model.lm_head.weight" not in index["weight_map"]  # tied to the embedding: stored once
    assert json.loads((out / "config.json").read_text())["ltm_config"] == checkpoint_config(read_checkpoint(trained_tiny))
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids).logits, load_model(trained_tiny)(ids).logits, rtol=0, atol=0)
    whole = invoke("export", "-c", str(trained_tiny), "--format", "safetensors", "--out", str(tmp_path / "one"))
    assert whole.returncode == 0, whole.stderr
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "model.safetensors"]
    args = ["-p", PROMPT, "-n", "40", "--seed", "1"]
    assert invoke("generate", "-c", str(out), *args).stdout == invoke("generate", "-c", str(trained_tiny), *args).stdout


def test_export_bad_input_exits_2_and_leaves_nothing_half_written(trained_tiny, tmp_path, monkeypatch):
    one_error_line(invoke("export", "-c", str(trained_tiny), "--format", "gguf", "--out", str(tmp_path / "x")),
                   "--format", "gguf", "safetensors")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    one_error_line(invoke("export", "-c", str(trained_tiny), "--format", "hf", "--out", str(existing)),
                   "already exists", "--overwrite")
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    model = load_model(trained_tiny)
    names = quantize_model(model, "bnb.int8")
    write_folder(quantized, model.state_dict(), checkpoint_config(read_checkpoint(trained_tiny)),
                 quantization_record("bnb.int8", names, model))
    one_error_line(invoke("export", "-c", str(quantized), "--format", "hf", "--out", str(tmp_path / "x")),
                   "quantized (bnb.int8)", "--format safetensors")
    one_error_line(invoke("export", "-c", str(trained_tiny), "--format", "safetensors", "--out", str(tmp_path / "x"),
                          "--shard-size", "lots"), "--shard-size")
    resharded = export_checkpoint(quantized, "safetensors", tmp_path / "q2")  # a quantized folder stays quantized
    assert read_checkpoint(resharded)["quantization"]["method"] == "bnb.int8"

    def broken(*args, **kwargs):  # a failure halfway through writing
        raise OSError("disk full")

    monkeypatch.setattr("ltm_core.export.safetensors.write_weights", broken)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(trained_tiny, "safetensors", tmp_path / "new" / "deeper" / "x")
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(trained_tiny, "safetensors", existing, overwrite=True)
    assert (existing / "keep.txt").read_text() == "mine"  # the old folder stays until a new one is complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "q2", "quantized"]
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    monkeypatch.undo()
    export_checkpoint(trained_tiny, "safetensors", existing, overwrite=True)
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "q2", "quantized"]


def test_hf_export_needs_the_extra(trained_tiny, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec  # as if `pip install ltm` without [hf]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(LtmError, match=r"pip install 'ltm\[hf\]'"):
        export_checkpoint(trained_tiny, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def exported(checkpoint, fmt: str, out):
    """`ltm export -c CHECKPOINT --format FMT --out OUT`, which must succeed -> OUT."""
    result = invoke("export", "-c", str(checkpoint), "--format", fmt, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def hf_folder(trained_tiny, tmp_path_factory):
    return exported(trained_tiny, "hf", tmp_path_factory.mktemp("hf") / "model")


def test_hf_folder_imports_ltm_core_and_loads_with_auto_classes(hf_folder, trained_tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = sorted(p.name for p in hf_folder.iterdir())
    for name in ("config.json", "configuration_ltm.py", "modeling_ltm.py", "model.safetensors", "tokenizer.json",
                 "generation_config.json", "README.md"):
        assert name in files
    modeling = (hf_folder / "modeling_ltm.py").read_text()
    assert "from ltm_core.export.hf import" in modeling and "class " not in modeling  # imported, not copied
    assert "ltm_core" in (hf_folder / "README.md").read_text()
    config = json.loads((hf_folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ltm.LtmForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(hf_folder, trust_remote_code=True)
    reference = load_model(trained_tiny)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert model.model.lm_head.weight is model.model.embed_tokens.weight  # tied again after loading
    with torch.no_grad():  # ltm reads the folder too (its config.json carries the run config)
        torch.testing.assert_close(load_model(hf_folder)(ids).logits, reference(ids).logits, rtol=0, atol=0)
    text = "naïve — ✓ bytes <eos><bos><pad>"  # the special tokens' names in text are bytes, as ByteTokenizer reads them
    for tokenizer in (AutoTokenizer.from_pretrained(hf_folder),
                      AutoTokenizer.from_pretrained(hf_folder, trust_remote_code=True)):
        assert len(tokenizer) == 259
        assert tokenizer(text).input_ids == ByteTokenizer().encode(text, bos=True)
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
        assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (257, 258)


def test_hf_model_saved_again_keeps_the_export_layout(hf_folder, tmp_path):
    """A model loaded from the folder and saved with save_pretrained writes the export's layout again (auto_map to
    the folder's configuration_ltm / modeling_ltm, no copy of ltm's module) and loads back to the same logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_folder, trust_remote_code=True)
    model.save_pretrained(tmp_path / "again")
    files = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert "modeling_ltm.py" in files and "configuration_ltm.py" in files and "hf.py" not in files, files
    saved = json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"]
    assert saved == json.loads((hf_folder / "config.json").read_text())["auto_map"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_hf_generate_gives_the_tokens_of_ltm_generate(hf_folder, trained_tiny):
    """Greedy and seeded sampling (temperature, top-k, top-p) over 5 segments: the same tokens as InferenceEngine,
    which `ltm generate` runs, and the same text as the command."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_folder, trust_remote_code=True)
    reference = load_model(trained_tiny)
    n = 5 * reference.config.segment_length
    greedy = model.generate(_ids(), do_sample=False, max_new_tokens=n)
    expected = InferenceEngine(reference, InferenceConfig(temperature=0)).generate(_ids(), n)
    assert torch.equal(greedy, expected) and greedy.shape[1] > _ids().shape[1] + 2 * reference.config.segment_length
    for options in ({"temperature": 1.3, "top_k": 40, "top_p": 0.95}, {"temperature": 0.8}):
        torch.manual_seed(7)
        sampled = model.generate(_ids(), do_sample=True, max_new_tokens=n, **options)
        expected = InferenceEngine(reference, InferenceConfig(seed=7, **options)).generate(_ids(), n)
        assert torch.equal(sampled, expected), options
    torch.manual_seed(7)
    by_default = model.generate(_ids(), max_new_tokens=n)  # the folder's defaults are ltm generate's
    assert torch.equal(by_default, expected)
    # transformers' own warpers compute the same filter; ltm's replace them so the code path is the same one
    from transformers import GenerationConfig

    processors = model._get_logits_processor(GenerationConfig(do_sample=True, temperature=1.3, top_k=40, top_p=0.95))
    assert [type(p).__name__ for p in processors] == ["LtmSampling"]
    tokenizer = AutoTokenizer.from_pretrained(hf_folder, trust_remote_code=True)
    cli = invoke("generate", "-c", str(trained_tiny), "-p", PROMPT, "-n", str(n), "--seed", "7", "-t", "1.3",
                 "--top-k", "40", "--top-p", "0.95")
    torch.manual_seed(7)
    sampled = model.generate(_ids(), max_new_tokens=n, temperature=1.3, top_k=40, top_p=0.95)
    assert cli.stdout == tokenizer.decode(sampled[0], skip_special_tokens=True) + "\n"


def test_hf_cache_is_the_bounded_memory_state(hf_folder, trained_tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_folder, trust_remote_code=True)
    S = model.model.config.segment_length
    out = model.generate(_ids(), do_sample=False, max_new_tokens=4 * S + 3, return_dict_in_generate=True)
    cache, read = out.cache, out.sequences[:, :-1]  # the last token was generated, not read
    assert cache.get_seq_length() == read.shape[1] and cache.state.offset == read.shape[1] % S < S
    with torch.no_grad():
        state = load_model(trained_tiny)(read).memory
    for mine, ref in zip(cache.state.memory, state.memory):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-5)
    uncached = model.generate(_ids(), do_sample=False, max_new_tokens=2 * S, use_cache=False)
    assert torch.equal(uncached, out.sequences[:, :uncached.shape[1]])  # re-reading everything: the same tokens
    for kwargs in ({"num_beams": 2}, {"prompt_lookup_num_tokens": 3}):
        with pytest.raises(ValueError, match="greedy decoding and sampling"):
            model.generate(_ids(), do_sample=False, max_new_tokens=4, **kwargs)
    with pytest.raises(ValueError, match="padding"):
        model.generate(torch.cat([_ids(), _ids()]), attention_mask=torch.tensor([[0] + [1] * 16, [1] * 17]),
                       max_new_tokens=2)


@pytest.fixture(scope="module")
def onnx_export(trained_tiny, tmp_path_factory):
    """`ltm export --format onnx` as a user runs it, warnings shown -> (the process, its folder)."""
    out = tmp_path_factory.mktemp("onnx") / "model"
    result = run_ltm("export", "-c", str(trained_tiny), "--format", "onnx", "--out", str(out), timeout=600,
                     warnings=True)
    assert result.returncode == 0, result.stderr
    return result, out


@pytest.fixture(scope="module")
def onnx_folder(onnx_export):
    return onnx_export[1]


def test_onnx_export_prints_only_its_result(onnx_export):
    """torch.onnx's notes that are not about the user's export (skipped torchvision ops, shared axis names, its own
    deprecations, a wrapper module's training flag) stay off the terminal (each by its words: another torch or
    onnxscript release may add notes of its own)."""
    result, out = onnx_export
    for note in ("torchvision is not installed", "The axis name", "LeafSpec", "in training mode"):
        assert note not in result.stderr, result.stderr
    assert f"wrote {out}" in " ".join(result.stdout.split())


def test_onnx_generation_over_segments_matches_pytorch(onnx_folder, trained_tiny):
    """Greedy generation through 3+ segments in onnxruntime: every step's logits and next state within 1e-4 of
    PyTorch's, the prompt read by decode_start/decode, whole segments by prefill, the completing token by prefill."""
    from ltm_core.export.onnx import OnnxModel, StateLayout

    model = load_model(trained_tiny)
    layout = StateLayout(model)
    onnx_model = OnnxModel(onnx_folder)
    S = model.config.segment_length
    assert set(onnx_model.sessions) >= {"prefill", "decode_start", "decode"}
    assert {t["name"] for t in onnx_model.manifest["tensors"] if t["token_dim"] is not None}  # the segment's KV
    prompt = torch.tensor([ByteTokenizer().encode("In the beginning God created", bos=True)])  # 1 segment + 13
    logits, state = onnx_model(prompt.numpy(), onnx_model.initial_state(1))
    with torch.no_grad():
        out = model(prompt)
    steps = []
    for _ in range(3 * S):
        steps.append((logits, out.logits, state, out.memory))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        logits, state = onnx_model(token.numpy(), state)
        with torch.no_grad():
            out = model(token, memory=out.memory)
    for onnx_logits, torch_logits, onnx_state, torch_state in steps:
        assert abs(onnx_logits - torch_logits.numpy()).max() <= 1e-4
        for name, tensor in zip(onnx_model.names, layout.from_state(torch_state, 1)):
            assert onnx_state[name].shape == tuple(tensor.shape), name
            if tensor.numel():
                assert abs(onnx_state[name] - tensor.detach().numpy()).max() <= 1e-4, name
    assert state.segments == out.memory.segments >= 4 and state.offset == out.memory.offset
    batch = torch.randint(0, 256, (3, S + 2), generator=torch.Generator().manual_seed(3))  # batch is dynamic
    logits, _ = onnx_model(batch.numpy(), onnx_model.initial_state(3))
    with torch.no_grad():
        assert abs(logits - model(batch).logits.numpy()).max() <= 1e-4


def test_onnx_export_needs_the_extra(trained_tiny, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    one_error_line(invoke("export", "-c", str(trained_tiny), "--format", "onnx", "--out", str(tmp_path / "o")),
                   "pip install 'ltm[onnx]'")
    assert not (tmp_path / "o").exists()


def test_onnx_first_segment_graph_when_the_first_write_differs(trained_tiny, tmp_path, monkeypatch):
    """A model whose first segment differs from the others (a memory kind may treat its initial content apart) gets
    prefill_first.onnx, and OnnxModel reads the first segment with it, the later ones with prefill."""
    import numpy as np

    from ltm_core.export import onnx as ox

    class FirstDiffers(type(load_model(trained_tiny))):
        def forward(self, input_ids, memory=None, labels=None):
            out = super().forward(input_ids, memory=memory, labels=labels)
            if memory is None or memory.segments == 0:
                out.logits = out.logits + 1.0
            return out

    model = load_model(trained_tiny)
    model.__class__ = FirstDiffers
    exported = []
    monkeypatch.setattr(ox, "_export", lambda module, args, path, shapes: exported.append(path.name))
    manifest = ox.export_graphs(model, tmp_path)
    assert exported == ["prefill.onnx", "prefill_first.onnx", "decode_start.onnx", "decode.onnx"]
    assert manifest["graphs"]["prefill_first"] == "prefill_first.onnx"

    class Recorder:  # stands for an onnxruntime session: echoes the state, records the graph
        def __init__(self, name, calls):
            self.name, self.calls = name, calls

        def run(self, _, feeds):
            self.calls.append((self.name, feeds["input_ids"].shape[1]))
            ids = feeds["input_ids"]
            return [np.zeros((*ids.shape, 259), np.float32), *[v for k, v in feeds.items() if k != "input_ids"]]

    calls = []
    runner = ox.OnnxModel.__new__(ox.OnnxModel)
    runner.S, runner.names, runner.manifest = manifest["segment_length"], [], manifest
    runner.sessions = {name: Recorder(name, calls) for name in manifest["graphs"]}
    S = runner.S
    state = ox.OnnxState()
    state.boundary = {}
    _, state = runner(np.zeros((1, S - 1), np.int64), state)  # the first segment token by token ...
    _, state = runner(np.zeros((1, 1), np.int64), state)  # ... completed by its first-segment prefill
    _, state = runner(np.zeros((1, S + 1), np.int64), state)
    assert calls == ([("decode_start", 1)] + [("decode", 1)] * (S - 2) + [("prefill_first", S), ("prefill", S),
                                                                         ("decode_start", 1)])
    assert (state.offset, state.segments) == (1, 2)


def test_state_tensors_are_found_by_structure():
    """The ONNX layout walks dataclasses, tuples and dicts: a memory kind whose state is a tuple of tensors, or a
    slot that is empty, flattens and rebuilds without naming a field."""
    import dataclasses

    from ltm_core.export.onnx import _leaves, _rebuild

    @dataclasses.dataclass
    class Layer:
        memory: object
        pending: object = None
        steps: int = 3  # plain values are structure, not state

    state = [Layer((torch.zeros(2, 4), torch.ones(2, 4, 4)), {"keys": torch.zeros(2, 1, 5)}), Layer(None)]
    leaves = dict(_leaves(state))
    assert list(leaves) == ["0.memory.0", "0.memory.1", "0.pending.keys", "1.memory", "1.pending"]
    rebuilt = _rebuild(state, {k: v + 1 for k, v in leaves.items() if v is not None})
    assert isinstance(rebuilt[0].memory, tuple) and rebuilt[0].steps == 3 and rebuilt[1].memory is None
    assert torch.equal(rebuilt[0].memory[1], torch.full((2, 4, 4), 2.0))
    assert torch.equal(rebuilt[0].pending["keys"], torch.ones(2, 1, 5))


def test_hf_export_after_loading_an_exported_folder_keeps_the_folders_auto_map(hf_folder, trained_tiny, tmp_path):
    """Loading a folder with trust_remote_code registers ltm_core's classes for the auto classes; a later export in
    the same process must still point config.json's auto_map at the folder's own files, not at ltm_core."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(hf_folder, trust_remote_code=True)
    again = exported(trained_tiny, "hf", tmp_path / "again")
    auto_map = json.loads((again / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_ltm.LtmConfig",
                        "AutoModelForCausalLM": "modeling_ltm.LtmForCausalLM"}, auto_map


def test_onnx_export_of_the_delta_memory_matches_pytorch(tmp_path):
    """The delta memory's write (a triangular solve, which ONNX lacks) exports as forward substitution: onnxruntime
    reads two segments and five tokens, a batch of 2, within 1e-4 of PyTorch's logits."""
    from support import kind_config, tiny_model
    from ltm_core.export.onnx import OnnxModel, export_graphs

    model = tiny_model(kind_config("delta"), perturb=True).eval()
    export_graphs(model, tmp_path)
    onnx_model = OnnxModel(tmp_path)
    ids = torch.randint(0, 256, (2, 2 * model.config.segment_length + 5), generator=torch.Generator().manual_seed(1))
    logits, state = onnx_model(ids.numpy(), onnx_model.initial_state(2))
    with torch.no_grad():
        assert abs(logits - model(ids).logits.numpy()).max() <= 1e-4
    assert state.segments == 2 and state.offset == 5
