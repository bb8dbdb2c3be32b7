"""`ltm export --format onnx`: the model as ONNX graphs whose recurrent state is explicit input and output tensors.

    DIR/prefill.onnx            input_ids [B, S] (one whole segment) + the state at a segment boundary -> logits
                                [B, S, V] + the state at the next boundary (the segment written to the memory)
    DIR/prefill_first.onnx      the same from the initial state, only when the first write differs from the others
                                (a memory kind may treat the learned initial memory apart)
    DIR/decode_start.onnx       token [B, 1] + the state at a boundary -> logits [B, 1, V] + the state with 1 token
                                of the segment read
    DIR/decode.onnx             token [B, 1] + the state with t tokens of the segment read (1 <= t <= S - 2,
                                dynamic) -> logits + the state with t + 1
    DIR/initial_state.safetensors   the state before any token, batch 1 (repeat it along dimension 0 for batch B)
    DIR/onnx.json               the state's tensors in graph order (the `state.*` inputs and `next.*` outputs)
    DIR/README.md

The state is found by its own structure, not by field names: `StateLayout` flattens a `MemoryState` (dataclasses,
tuples and tensors, nested) into its tensors, and learns from two reference states which of them grow with the
tokens read in the current segment (the segment's keys, values, pending entries: a fixed-size dimension of at
most S - 1 once complete) and which have a fixed shape (the memory kind's state, convolution carries). At a segment
boundary the growing tensors have length 0. So a new memory kind's state exports without changes here.

The token that completes a segment is read by `prefill` over the segment's S tokens from the boundary state
(`OnnxModel` keeps both): every token costs at most one segment's attention and the state stays bounded. Graphs are
exported by the torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`, opset 20) and run in
onnxruntime on CPU (`OnnxModel`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from ltm_core.errors import LtmError
from ltm_core.export import require
from ltm_core.memory import MemoryState
from ltm_core.model import TitanModel

OPSET = 20
GRAPHS = ("prefill", "prefill_first", "decode_start", "decode")


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Optional[torch.Tensor]]]:
    """(path, tensor or None) of every tensor slot of a state, depth first: dataclass fields, tuple/list items, dict
    values (ints and other plain values are structure, kept from the template)."""
    if obj is None or isinstance(obj, torch.Tensor):
        yield path, obj
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None or isinstance(value, (torch.Tensor, tuple, list, dict)) or dataclasses.is_dataclass(value):
                yield from _leaves(value, f"{path}.{f.name}" if path else f.name)
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            yield from _leaves(item, f"{path}.{i}" if path else str(i))
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))


def _rebuild(template: Any, values: dict[str, Optional[torch.Tensor]], path: str = "") -> Any:
    """`template` (a state of the same structure) with each tensor slot replaced by values[path]."""
    if template is None or isinstance(template, torch.Tensor):
        return values.get(path)  # a slot that is always empty in this model stays None
    if dataclasses.is_dataclass(template):
        changes = {}
        for f in dataclasses.fields(template):
            value = getattr(template, f.name)
            if value is None or isinstance(value, (torch.Tensor, tuple, list, dict)) or dataclasses.is_dataclass(value):
                changes[f.name] = _rebuild(value, values, f"{path}.{f.name}" if path else f.name)
        return dataclasses.replace(template, **changes)
    if isinstance(template, (tuple, list)):
        items = [_rebuild(item, values, f"{path}.{i}" if path else str(i)) for i, item in enumerate(template)]
        return type(template)(items)
    if isinstance(template, dict):
        return {k: _rebuild(item, values, f"{path}.{k}" if path else str(k)) for k, item in template.items()}
    return template


class StateLayout:
    """The state's tensors as a flat list in a fixed order, and back. Learned from the model itself: the state
    after 1 and after 2 tokens (every slot filled) tells which tensors grow with the segment's tokens and along
    which dimension; the state after a whole segment tells which slots are empty at a boundary."""

    def __init__(self, model: TitanModel):
        with torch.no_grad():
            ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
            one, two = model(ids[:, :1]).memory, model(ids).memory
            boundary = model(torch.zeros(1, model.config.segment_length, dtype=torch.long, device=ids.device)).memory
        self.template = one
        a, b, edge = dict(_leaves(one)), dict(_leaves(two)), dict(_leaves(boundary))
        self.paths = [p for p, t in a.items() if t is not None]
        self.shapes: dict[str, list[int]] = {}  # batch-1 shapes with the token dimension at 0 (its boundary size)
        self.token_dim: dict[str, Optional[int]] = {}
        for p in self.paths:
            if b[p] is None or b[p].dim() != a[p].dim():
                raise LtmError(f"export error: the state tensor {p} changes its structure inside a segment")
            grows = [d for d in range(a[p].dim()) if a[p].shape[d] != b[p].shape[d]]
            if len(grows) > 1 or (grows and b[p].shape[grows[0]] != a[p].shape[grows[0]] + 1):
                raise LtmError(f"export error: the state tensor {p} does not grow by one token per token")
            self.token_dim[p] = grows[0] if grows else None
            shape = list(a[p].shape)
            if grows:
                shape[grows[0]] = 0
            self.shapes[p] = shape
        self.empty_at_boundary = {p for p in self.paths if edge.get(p) is None}
        self.dtypes = {p: a[p].dtype for p in self.paths}

    @property
    def growing(self) -> list[str]:
        return [p for p in self.paths if self.token_dim[p] is not None]

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{p}" for p in self.paths]

    def empty(self, p: str, batch: int, device=None) -> torch.Tensor:
        return torch.zeros([batch, *self.shapes[p][1:]], dtype=self.dtypes[p], device=device)

    def to_state(self, tensors, batch: int, boundary: bool, first: bool) -> MemoryState:
        """Graph inputs -> the MemoryState the model reads. At a boundary the slots empty there are None (the
        model's own boundary state); inside a segment, t is the growing tensors' length."""
        values = dict(zip(self.paths, tensors))
        if boundary:
            values.update({p: None for p in self.empty_at_boundary})
            offset = 0
        else:
            p = self.growing[0]
            offset = values[p].shape[self.token_dim[p]]
        state = _rebuild(self.template, values)
        return dataclasses.replace(state, offset=offset, segments=0 if first else 1, batch_size=batch)

    def from_state(self, state: MemoryState, batch: int) -> list[torch.Tensor]:
        """MemoryState -> graph outputs: empty slots become zeros (length 0 for the growing tensors)."""
        values = dict(_leaves(state))
        return [values[p] if values.get(p) is not None else self.empty(p, batch) for p in self.paths]

    def describe(self) -> dict[str, Any]:
        return {"tensors": [{"name": p, "shape_batch1": self.shapes[p], "token_dim": self.token_dim[p],
                             "dtype": str(self.dtypes[p]).replace("torch.", ""),
                             "empty_at_boundary": p in self.empty_at_boundary} for p in self.paths]}


class _Step(nn.Module):
    """One graph: (input ids, state tensors) -> (logits, next state tensors), through the model's own forward."""

    def __init__(self, model: TitanModel, layout: StateLayout, boundary: bool, first: bool):
        super().__init__()
        self.model, self.layout, self.boundary, self.first = model, layout, boundary, first

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor):
        batch = input_ids.shape[0]
        out = self.model(input_ids, memory=self.layout.to_state(state, batch, self.boundary, self.first))
        return (out.logits, *self.layout.from_state(out.memory, batch))


def _example_state(model: TitanModel, layout: StateLayout, ids: torch.Tensor, boundary_state: MemoryState):
    with torch.no_grad():
        out = model(ids, memory=boundary_state)
    return out, layout.from_state(out.memory, ids.shape[0])


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx's notes that are not about this export: torchvision's ops it skips, a dynamic axis name shared by
    several inputs (the graphs name theirs in onnx.json), torch's own deprecations."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: ")
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _export(module: _Step, args: tuple, path: Path, dynamic_shapes) -> None:
    with _quiet_exporter():
        torch.onnx.export(module.eval(), args, str(path), dynamo=True, opset_version=OPSET,
                          dynamic_shapes=dynamic_shapes, input_names=["input_ids", *module.layout.names("state")],
                          output_names=["logits", *module.layout.names("next")], external_data=False,
                          verbose=False, report=False)


def export_graphs(model: TitanModel, folder: Path) -> dict[str, Any]:
    """Write the graphs, initial_state.safetensors and onnx.json into `folder`; returns onnx.json's content."""
    from safetensors.torch import save_file

    model = model.eval()
    S = model.config.segment_length
    if S < 3:
        raise LtmError(f"export error: ONNX decoding needs model.segment_length >= 3, got {S}")
    layout = StateLayout(model)
    batch = torch.export.Dim("batch", min=1, max=4096)
    B = 2  # the example batch: not 1, which torch.export would take for a constant
    g = torch.Generator().manual_seed(0)
    segment = torch.randint(0, 256, (B, S), generator=g)
    with torch.no_grad():
        initial = model.initial_state(B)
        first_out = model(segment, memory=initial)
    initial_tensors = layout.from_state(initial, B)
    boundary_tensors = layout.from_state(first_out.memory, B)
    fixed = {0: batch}

    def shapes(dynamic_tokens: Optional[torch.export.Dim]):
        """(input_ids, the *state tuple): batch dynamic everywhere, with `dynamic_tokens` the segment's tokens."""
        specs = []
        for p in layout.paths:
            spec = dict(fixed)
            if dynamic_tokens is not None and layout.token_dim[p] is not None:
                spec[layout.token_dim[p]] = dynamic_tokens
            specs.append(spec)
        return ({0: batch}, tuple(specs))

    written = {}
    prefill = _Step(model, layout, boundary=True, first=False)
    _export(prefill, (segment, *boundary_tensors), folder / "prefill.onnx", shapes(None))
    written["prefill"] = "prefill.onnx"
    # the first write may differ (e.g. a memory that prefers any token to its initial content): check it
    with torch.no_grad():
        later = prefill(segment, *initial_tensors)
    if not all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in
               zip(later, (first_out.logits, *layout.from_state(first_out.memory, B)))):
        _export(_Step(model, layout, boundary=True, first=True), (segment, *initial_tensors),
                folder / "prefill_first.onnx", shapes(None))
        written["prefill_first"] = "prefill_first.onnx"
    token = segment[:, :1]
    _export(_Step(model, layout, boundary=True, first=False), (token, *boundary_tensors),
            folder / "decode_start.onnx", shapes(None))
    written["decode_start"] = "decode_start.onnx"
    _, mid = _example_state(model, layout, segment[:, :3], first_out.memory)  # t = 3 tokens read
    tokens = torch.export.Dim("tokens", min=1, max=S - 2)
    _export(_Step(model, layout, boundary=False, first=False), (token, *mid), folder / "decode.onnx",
            shapes(tokens))
    written["decode"] = "decode.onnx"
    save_file({name: t[:1].contiguous() for name, t in zip(layout.names("state"), initial_tensors)},
              str(folder / "initial_state.safetensors"))
    manifest = {"segment_length": S, "vocab_size": model.config.vocab_size, "opset": OPSET, "graphs": written,
                **layout.describe()}
    (folder / "onnx.json").write_text(json.dumps(manifest, indent=2))
    return manifest


README = """# ltm model (ONNX)

Exported by `ltm export --format onnx`. The recurrent state is explicit: every graph takes `input_ids` and the
state tensors `state.*` and returns `logits` and the next state `next.*` (same order, listed in onnx.json).

| graph | reads | state in -> out |
| --- | --- | --- |
| prefill.onnx | a whole segment, input_ids [B, S] | segment boundary -> next boundary (memory written) |
| prefill_first.onnx (if present) | the first segment | the initial state -> boundary |
| decode_start.onnx | one token [B, 1] | boundary -> 1 token of the segment read |
| decode.onnx | one token [B, 1] | t tokens read (1 <= t <= S - 2) -> t + 1 |

The token that completes a segment is read by prefill over the segment's S tokens from the state at its start.
initial_state.safetensors holds the state before any token for batch 1 (repeat along dimension 0). At a boundary
the tensors that grow with the segment's tokens (onnx.json: token_dim) have length 0.

In Python, `ltm_core.export.onnx.OnnxModel(DIR)` runs the graphs with onnxruntime:

```python
from ltm_core.export.onnx import OnnxModel
onnx_model = OnnxModel(DIR)
state = onnx_model.initial_state(batch=1)
logits, state = onnx_model(input_ids, state)       # numpy int64 [B, T] -> [B, T, V], any T, like TitanModel
```
"""


def export_onnx(checkpoint: str | Path, ckpt: dict[str, Any], out: Path, overwrite: bool = False) -> Path:
    from ltm_core.checkpoint import load_model
    from ltm_core.export import output_folder

    require("onnx", "onnx", "onnxscript")
    model = load_model(checkpoint, ckpt=ckpt)
    with output_folder(out, overwrite) as staging:
        export_graphs(model, staging)
        (staging / "README.md").write_text(README)
    return out


class OnnxState(dict):
    """The state tensors by name (numpy), plus where the current segment stands: `offset` tokens read, the
    `boundary` state at its start and its `tokens` (to complete it with prefill), `segments` written."""

    offset: int = 0
    segments: int = 0
    boundary: Optional[dict] = None
    tokens: Optional[np.ndarray] = None


class OnnxModel:
    """The exported graphs in onnxruntime, read like TitanModel: `logits, state = model(input_ids, state)` for
    any number of tokens, choosing the graph for each piece as TitanModel reads segments."""

    def __init__(self, folder: str | Path, providers: Optional[list[str]] = None):
        require("onnx", "onnxruntime")
        import onnxruntime as ort
        from safetensors.numpy import load_file

        folder = Path(folder)
        self.manifest = json.loads((folder / "onnx.json").read_text())
        self.S = int(self.manifest["segment_length"])
        self.names = [t["name"] for t in self.manifest["tensors"]]
        self.sessions = {name: ort.InferenceSession(str(folder / file), providers=providers or ["CPUExecutionProvider"])
                         for name, file in self.manifest["graphs"].items()}
        self.initial = load_file(str(folder / "initial_state.safetensors"))

    def initial_state(self, batch: int = 1) -> OnnxState:
        state = OnnxState({n: np.repeat(self.initial[f"state.{n}"], batch, axis=0) for n in self.names})
        state.boundary, state.tokens = dict(state), None
        return state

    def _run(self, graph: str, ids: np.ndarray, state: dict) -> tuple[np.ndarray, dict]:
        outputs = self.sessions[graph].run(None, {"input_ids": ids.astype(np.int64),
                                                  **{f"state.{n}": state[n] for n in self.names}})
        return outputs[0], dict(zip(self.names, outputs[1:]))

    def __call__(self, input_ids: np.ndarray, state: OnnxState) -> tuple[np.ndarray, OnnxState]:
        """input_ids [B, T] -> logits [B, T, V] and the state after them (`state` is not changed)."""
        offset, segments, boundary, tokens, current = state.offset, state.segments, state.boundary, state.tokens, dict(state)
        pieces, pos = [], 0
        while pos < input_ids.shape[1]:
            if offset == 0 and input_ids.shape[1] - pos >= self.S:  # a whole segment at once
                graph = "prefill_first" if segments == 0 and "prefill_first" in self.sessions else "prefill"
                logits, current = self._run(graph, input_ids[:, pos:pos + self.S], current)
                pieces.append(logits)
                pos, segments, boundary, tokens = pos + self.S, segments + 1, dict(current), None
                continue
            token = input_ids[:, pos:pos + 1]
            if offset == self.S - 1:  # completes the segment: read it whole from its start
                graph = "prefill_first" if segments == 0 and "prefill_first" in self.sessions else "prefill"
                logits, current = self._run(graph, np.concatenate([tokens, token], axis=1), boundary)
                pieces.append(logits[:, -1:])
                offset, segments, boundary, tokens = 0, segments + 1, dict(current), None
            else:
                logits, current = self._run("decode_start" if offset == 0 else "decode", token, current)
                pieces.append(logits)
                tokens = token if tokens is None else np.concatenate([tokens, token], axis=1)
                offset += 1
            pos += 1
        result = OnnxState(current)
        result.offset, result.segments, result.boundary, result.tokens = offset, segments, boundary, tokens
        return np.concatenate(pieces, axis=1), result
