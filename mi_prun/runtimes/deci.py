"""A Llama-family GGUF rewritten as llama.cpp's `deci` architecture, with sublayers taken out.

`deci` (Llama-3.1-Nemotron) reads per-layer `attention.head_count`, `attention.head_count_kv`
and `feed_forward_length` arrays: a layer with 0 heads has no attention (and no KV cache), a
layer with heads but 0 KV heads applies its output projection alone to the normed input
("linear attention"). Its tensors are Llama's, rotary order included, so a `llama` GGUF's kept
tensors are copied byte for byte.

A layer whose feed-forward sublayer is removed but whose attention stays gets a feed-forward
stub of width 1 with zero weights (f32, 3 x hidden + hidden floats) rather than n_ff = 0: in the
deci graph of the llama.cpp this package ships (llama-cpp-python 0.3.36, `src/models/deci.cpp`)
a layer with n_ff == 0 `continue`s before its attention output is added to the stream, and its
loader still requires the feed-forward tensors. The stub adds exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Mapping, Sequence

import gguf
import numpy as np

from mi_prun.errors import UserError

from .gguf_prune import (BLOCK_TENSOR, WRITER_OWNED_PREFIX, ReplaceType, declare_tensors, field_value, model_info, open_gguf, write_file,
                         writer_like)

DECI_ARCH = "deci"
# GGUF architectures whose tensors (names, layout, rotary order) deci reads as they are.
DECI_SOURCE_ARCHS = ("llama",)
# Keys deci reads per layer; a source holds them as one number for every layer.
HEAD_COUNT, HEAD_COUNT_KV, FFN_LENGTH = "attention.head_count", "attention.head_count_kv", "feed_forward_length"
STUB_FFN = 1  # width of the zero feed-forward network of a layer that keeps only its attention


class Attention(str, Enum):
    kept = "kept"
    linear = "linear"  # the output projection applied to the normed input (a fitted map)
    removed = "removed"


@dataclass(frozen=True)
class LayerForm:
    """What one source layer keeps."""

    attention: Attention = Attention.kept
    ffn: bool = True

    @property
    def empty(self) -> bool:
        return self.attention is Attention.removed and not self.ffn


@dataclass
class DeciReport:
    source: Path
    output: Path
    layers: int  # layers written (a source layer with nothing kept is left out)
    head_count: list[int] = field(default_factory=list)
    head_count_kv: list[int] = field(default_factory=list)
    feed_forward_length: list[int] = field(default_factory=list)
    tensors_dropped: int = 0
    tensors_written: int = 0
    stub_ffn_layers: list[int] = field(default_factory=list)  # written layer indices
    replaced: dict[str, str] = field(default_factory=dict)


def _dropped(suffix: str, form: LayerForm) -> bool:
    """Whether a layer tensor (`attn_q.weight`, ...) goes, given what the layer keeps."""
    part = suffix.split(".")[0]
    if part.startswith("attn_"):
        if form.attention is Attention.removed:
            return True
        return form.attention is Attention.linear and part in ("attn_q", "attn_k", "attn_v")
    if part.startswith("ffn_"):
        return not form.ffn
    return False


def _scalar(reader: gguf.GGUFReader, key: str) -> int:
    value = field_value(reader, key)
    if isinstance(value, list):
        raise UserError(f"{key} is per-layer already in this GGUF; a deci rewrite needs a uniform source")
    if value is None:
        raise UserError(f"the GGUF has no {key}")
    return int(value)


def deci_arrays(reader: gguf.GGUFReader, arch: str, forms: Sequence[LayerForm]) -> tuple[list[int], list[int], list[int]]:
    """Per written layer: heads, KV heads and feed-forward width."""
    heads, kv, ffn = (_scalar(reader, f"{arch}.{k}") for k in (HEAD_COUNT, HEAD_COUNT_KV, FFN_LENGTH))
    out: tuple[list[int], list[int], list[int]] = ([], [], [])
    for form in forms:
        if form.empty:
            continue
        out[0].append(0 if form.attention is Attention.removed else heads)
        out[1].append(kv if form.attention is Attention.kept else 0)
        out[2].append(ffn if form.ffn else (STUB_FFN if form.attention is not Attention.removed else 0))
    return out


def _stub_tensors(layer: int, hidden: int) -> list[tuple[str, np.ndarray]]:
    zeros_in = np.zeros((STUB_FFN, hidden), dtype=np.float32)  # numpy (rows, cols) = GGUF (cols, rows)
    return [
        (f"blk.{layer}.ffn_norm.weight", np.ones(hidden, dtype=np.float32)),
        (f"blk.{layer}.ffn_gate.weight", zeros_in),
        (f"blk.{layer}.ffn_up.weight", zeros_in.copy()),
        (f"blk.{layer}.ffn_down.weight", np.zeros((hidden, STUB_FFN), dtype=np.float32)),
    ]


def write_deci(source: Path, output: Path, forms: Sequence[LayerForm], replace: Mapping[str, np.ndarray] | None = None,
               replace_type: ReplaceType | None = None) -> DeciReport:
    """`output`: the `source` GGUF (a Llama-family one) as deci, each layer as `forms` says. Tensors
    in `replace` (source names: compensated weights) are encoded in `replace_type(their type)` or
    their own type; every other kept tensor keeps its bytes."""
    replace = dict(replace or {})
    reader = open_gguf(source)
    info = model_info(reader, source)
    if info.arch not in DECI_SOURCE_ARCHS:
        raise UserError(f"a {info.arch} GGUF cannot be written as deci (sublayer pruning reads {', '.join(DECI_SOURCE_ARCHS)} GGUFs)")
    if len(forms) != info.block_count:
        raise ValueError(f"{len(forms)} layer forms for a GGUF of {info.block_count} layers")
    if all(f.empty for f in forms):
        raise UserError("every sublayer would be removed")
    heads, kv, ffn = deci_arrays(reader, info.arch, forms)
    written_index = {old: new for new, old in enumerate(i for i, f in enumerate(forms) if not f.empty)}
    report = DeciReport(Path(source), Path(output), len(written_index), heads, kv, ffn)
    hidden = _scalar(reader, f"{info.arch}.embedding_length")

    writer = writer_like(reader, output, DECI_ARCH)
    _copy_metadata(reader, writer, info.arch, forms, report)
    items = _declare_tensors(reader, writer, forms, written_index, replace, replace_type, hidden, report)
    write_file(writer, reader, Path(source), items)
    report.tensors_written = len(items)
    return report


def _declare_tensors(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, forms: Sequence[LayerForm], written_index: dict[int, int],
                     replace: dict[str, np.ndarray], replace_type: ReplaceType | None, hidden: int,
                     report: DeciReport) -> list[gguf.ReaderTensor | np.ndarray]:
    """The kept tensors (renumbered, replaced ones encoded) and the feed-forward stubs, declared to
    the writer; returns what to write for each: a tensor to copy as is, or new data."""
    def rename(name: str) -> str | None:
        match = BLOCK_TENSOR.match(name)
        if not match:
            return name
        layer, suffix = int(match.group(1)), match.group(2)
        return None if forms[layer].empty or _dropped(suffix, forms[layer]) else f"blk.{written_index[layer]}.{suffix}"

    items, report.tensors_dropped = declare_tensors(reader, writer, rename, replace, replace_type, report.replaced)
    if replace:
        raise ValueError(f"tensors to replace are not kept in the source: {sorted(replace)}")
    for old, new in written_index.items():
        if not forms[old].ffn and forms[old].attention is not Attention.removed:
            report.stub_ffn_layers.append(new)
            for name, data in _stub_tensors(new, hidden):
                writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, gguf.GGMLQuantizationType.F32)
                items.append(data)
    return items


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, arch: str, forms: Sequence[LayerForm], report: DeciReport) -> None:
    """The source's keys under deci's namespace; the layer count and the three per-layer arrays
    set; any other per-layer array sliced to the written layers."""
    per_layer = {f"{arch}.{k}" for k in (HEAD_COUNT, HEAD_COUNT_KV, FFN_LENGTH)}
    block_count = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    kept = [i for i, f in enumerate(forms) if not f.empty]
    for f in reader.fields.values():
        if f.name.startswith(WRITER_OWNED_PREFIX) or f.name == gguf.Keys.General.ARCHITECTURE or f.name in per_layer:
            continue
        value_type = f.types[0]
        sub_type = f.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        key = f"{DECI_ARCH}.{f.name.removeprefix(arch + '.')}" if f.name.startswith(arch + ".") else f.name
        if f.name == block_count:
            value = report.layers
        elif value_type == gguf.GGUFValueType.ARRAY and f.name.startswith(arch + ".") and len(value) == len(forms):
            value = [value[i] for i in kept]
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    for key, values in ((HEAD_COUNT, report.head_count), (HEAD_COUNT_KV, report.head_count_kv), (FFN_LENGTH, report.feed_forward_length)):
        writer.add_key_value(f"{DECI_ARCH}.{key}", values, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
