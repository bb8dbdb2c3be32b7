"""`ltm export --format hf`: a folder that `transformers` loads with `trust_remote_code=True`.

    DIR/config.json                  LtmConfig: the run config (`ltm_config`) + auto_map to the two files below
    DIR/configuration_ltm.py         `from ltm_core.export.hf import LtmConfig`
    DIR/modeling_ltm.py              `from ltm_core.export.hf import LtmCache, LtmForCausalLM`
    DIR/model.safetensors            the weights (sharded above the shard size), named "model.<TitanModel name>"
    DIR/generation_config.json       `ltm generate`'s defaults (sampling at temperature 0.8, no top-k/top-p)
    DIR/tokenizer.json (+ config)    the 259-token byte tokenizer (bytes 0-255, then <bos> <eos> <pad>)
    DIR/README.md

The remote code imports this module, which wraps `ltm_core.TitanModel` itself: there is no second copy of the
model to drift from it (the folder needs `pip install ltm`, and says so). The recurrent state - each layer's memory
and the current segment's keys/values, a `MemoryState` - is the model's cache (`LtmCache`), so generation past one
segment keeps constant memory. Sampling goes through `ltm_core.inference.filter_logits`, the function `ltm generate`
samples with: greedy, and sampling after `torch.manual_seed(s)`, give the tokens of `ltm generate [--seed s]`.
Beam search and assisted decoding would have to reorder or roll back the state, which a memory that is rewritten
every segment cannot do: they are refused with a clear error, as transformers' stateful models do.
"""

from __future__ import annotations

import contextlib

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ltm_core.config import TitanConfig
from ltm_core.errors import LtmError
from ltm_core.inference import InferenceConfig, filter_logits
from ltm_core.memory import MemoryState
from ltm_core.model import TitanModel
from ltm_core.tokenizer import BOS, EOS, PAD, VOCAB_SIZE

try:
    from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.cache_utils import Cache
    from transformers.generation import GenerationMode
    from transformers.generation.logits_process import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as exc:  # the `hf` extra
    raise LtmError(f"the Hugging Face export needs transformers: pip install 'ltm[hf]' ({exc})") from None

MODELING = '''"""LtmForCausalLM for transformers (trust_remote_code=True). The model is ltm's own TitanModel, imported from the
installed `ltm` package (pip install ltm), not a copy: see README.md."""

from ltm_core.export.hf import LtmCache, LtmForCausalLM  # noqa: F401
'''
CONFIGURATION = '''"""LtmConfig for transformers (trust_remote_code=True), from the installed `ltm` package: see README.md."""

from ltm_core.export.hf import LtmConfig  # noqa: F401
'''
@contextlib.contextmanager
def _unregistered(*classes):
    """Save without the auto-class registration that loading an exported folder with trust_remote_code leaves on
    these classes (the folder's modules import them from ltm_core): registered, save_pretrained would rewrite
    config.json's auto_map to ltm_core's module instead of the folder's configuration_ltm / modeling_ltm."""
    saved = [cls.__dict__.get("_auto_class") for cls in classes]
    for cls in classes:
        cls._auto_class = None
    try:
        yield
    finally:
        for cls, value in zip(classes, saved):
            cls._auto_class = value


AUTO_MAP = {"AutoConfig": "configuration_ltm.LtmConfig", "AutoModelForCausalLM": "modeling_ltm.LtmForCausalLM"}


class LtmConfig(PretrainedConfig):
    """The run config of the checkpoint (`ltm_config`, as `ltm train` wrote it), with the model's sizes mirrored
    under transformers' usual names."""

    model_type = "ltm"

    def __init__(self, ltm_config: Optional[dict[str, Any]] = None, **kwargs):
        self.ltm_config = ltm_config or {"model": {}}
        model = TitanConfig.from_dict(self.ltm_config["model"])
        self.vocab_size, self.hidden_size = model.vocab_size, model.hidden_size
        self.num_hidden_layers, self.num_attention_heads = model.num_hidden_layers, model.num_attention_heads
        for key, value in (("bos_token_id", BOS), ("eos_token_id", EOS), ("pad_token_id", PAD),
                           ("tie_word_embeddings", model.tie_word_embeddings)):
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)

    @property
    def titan(self) -> TitanConfig:
        return TitanConfig.from_dict(self.ltm_config["model"])


class LtmCache(Cache):
    """The recurrent state as transformers' cache: `state` is the MemoryState after the tokens read so far."""

    def __init__(self, state: Optional[MemoryState] = None, seen: int = 0):
        super().__init__(layers=[])
        self.state, self.seen = state, seen

    def update_state(self, state: MemoryState, new_tokens: int) -> None:
        self.state, self.seen = state, self.seen + new_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    @property
    def is_croppable(self) -> bool:
        return False

    def _unsupported(self, *args, **kwargs):
        raise ValueError("LtmCache holds a recurrent memory that is rewritten every segment: it cannot be reordered, "
                         "cropped or rolled back (beam search, assisted decoding); use greedy decoding or sampling")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported


class LtmSampling(LogitsProcessor):
    """Temperature, top-k and top-p exactly as `ltm generate` applies them (`ltm_core.inference.filter_logits`)."""

    def __init__(self, config: InferenceConfig):
        self.config = config

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return filter_logits(scores, self.config)


class LtmForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LtmConfig
    base_model_prefix = "ltm"  # no base model inside: the wrapped TitanModel is the whole network
    main_input_name = "input_ids"
    _supported_generation_modes = [GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE]

    def __init__(self, config: LtmConfig):
        super().__init__(config)
        self.model = TitanModel(config.titan)
        self.model.tie_weights()  # also when built on the meta device (from_pretrained), where init does not tie
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own cache (LtmCache), as transformers' recurrent models do

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' save in the layout `ltm export --format hf` writes, also for a model loaded from such a
        folder: config.json's auto_map names the folder's configuration_ltm / modeling_ltm, which import ltm_core
        (without this, the auto-class registration that loading left would copy this module into the folder)."""
        self.config.auto_map = AUTO_MAP
        with _unregistered(LtmConfig, LtmForCausalLM):
            super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            (Path(save_directory) / "modeling_ltm.py").write_text(MODELING)
            (Path(save_directory) / "configuration_ltm.py").write_text(CONFIGURATION)

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, TitanModel) and module.embed_tokens.weight.device.type != "meta":
            module.init_weights()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[LtmCache] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, return_dict: Optional[bool] = None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids [B, T] continue from `cache` (None: a new sequence). `labels` as in transformers: the input ids,
        shifted inside (-100: no loss). `attention_mask` must be all ones: a memory model reads every token, so
        padded batches are refused."""
        if input_ids is None:
            raise ValueError("LtmForCausalLM reads input_ids (inputs_embeds are not supported)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("LtmForCausalLM cannot skip padding: every token is written to the memory; generate "
                             "prompts of different lengths one at a time")
        if cache is not None and not isinstance(cache, LtmCache):
            raise ValueError(f"LtmForCausalLM carries its state in an LtmCache, got {type(cache).__name__}")
        out = self.model(input_ids, memory=cache.state if cache is not None else None)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if use_cache is False:
            return CausalLMOutputWithPast(loss=loss, logits=out.logits)
        cache = cache if cache is not None else LtmCache()
        cache.update_state(out.memory, input_ids.shape[1])
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, cache=cache)

    def _validate_generation_mode(self, generation_mode, *args, **kwargs):
        if generation_mode not in self._supported_generation_modes:
            raise ValueError(f"LtmForCausalLM supports greedy decoding and sampling, not {generation_mode.value}: its "
                             "cache is a recurrent memory rewritten every segment, which beam search and assisted "
                             "decoding would have to reorder or roll back")
        return super()._validate_generation_mode(generation_mode, *args, **kwargs)

    def _get_logits_processor(self, generation_config: GenerationConfig, *args, **kwargs) -> LogitsProcessorList:
        """transformers' processors, with its temperature/top-k/top-p warpers replaced by `ltm generate`'s."""
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        if not generation_config.do_sample:
            return processors
        warpers = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
        kept = LogitsProcessorList(p for p in processors if not isinstance(p, warpers))
        top_k, top_p = generation_config.top_k, generation_config.top_p
        kept.append(LtmSampling(InferenceConfig(temperature=generation_config.temperature or 1.0,
                                                top_k=top_k if top_k else None,
                                                top_p=top_p if top_p is not None and top_p < 1 else None)))
        return kept


def byte_chars() -> list[str]:
    """The printable stand-in of each byte in the ByteLevel pre-tokenizer's alphabet (GPT-2's): bytes that print in
    Latin-1 stand for themselves, the others for chr(256 + n) in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer():
    """ltm's ByteTokenizer as a transformers fast tokenizer: byte b -> id b (a BPE with no merges over the byte
    alphabet), <bos> 256 prepended like `ltm generate` does, <eos> 257, <pad> 258. Text is bytes only, as in
    ByteTokenizer: "<eos>" written in a prompt is its five bytes, not the special token (`split_special_tokens`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(byte_chars())}
    vocab.update({"<bos>": BOS, "<eos>": EOS, "<pad>": PAD})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", BOS)])
    tok.add_special_tokens(["<bos>", "<eos>", "<pad>"])
    assert tok.get_vocab_size() == VOCAB_SIZE
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   model_max_length=10**9, split_special_tokens=True)


def readme(checkpoint: str | Path) -> str:
    from importlib.metadata import version

    return f"""# ltm model (Hugging Face format)

Exported by `ltm export --format hf` (ltm {version('ltm')}) from `{checkpoint}`.

The modeling code (`modeling_ltm.py`, `configuration_ltm.py`) imports the `ltm` package (`ltm_core`): it is ltm's
own model, not a copy. Install ltm with its `hf` extra in the environment that loads this folder:

    pip install "ltm[hf]"        # or: pip install -e "/path/to/ltm[hf]"

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(DIR)          # bytes 0-255, <bos> 256 (prepended), <eos> 257, <pad> 258
ids = tokenizer("In the beginning", return_tensors="pt").input_ids
out = model.generate(ids, do_sample=False, max_new_tokens=200)   # == ltm generate -t 0 -n 200
torch.manual_seed(0)
out = model.generate(ids, max_new_tokens=200)                    # == ltm generate --seed 0 -n 200 (temperature 0.8)
print(tokenizer.decode(out[0], skip_special_tokens=True))
```

The memory state is the model's cache (`LtmCache`): generation keeps constant memory however long the output.
Greedy decoding and sampling (temperature, top_k, top_p) are supported; beam search and assisted decoding are not
(the recurrent memory cannot be reordered or rolled back). Padded batches are refused: generate prompts of
different lengths one at a time.
"""


def export_hf(checkpoint: str | Path, ckpt: dict[str, Any], out: Path, overwrite: bool = False,
              max_shard_bytes: Optional[int] = None) -> Path:
    from ltm_core.checkpoint import current_run_config, load_model
    from ltm_core.export import output_folder
    from ltm_core.export.safetensors import DEFAULT_SHARD_BYTES

    model = load_model(checkpoint, ckpt=ckpt)
    config = LtmConfig(ltm_config=current_run_config(ckpt, checkpoint))
    with torch.device("meta"):
        hf = LtmForCausalLM(config)
    hf.model = model  # the loaded weights themselves
    hf.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=True,
                                            temperature=0.8, top_k=0, top_p=1.0, max_new_tokens=200)
    with output_folder(out, overwrite) as staging:
        hf.save_pretrained(staging, max_shard_size=max_shard_bytes or DEFAULT_SHARD_BYTES)
        byte_tokenizer().save_pretrained(staging)
        (staging / "README.md").write_text(readme(checkpoint))
    return out
