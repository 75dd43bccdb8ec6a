"""Weights providers: where a block's tensors come from when the block runner needs them.

`ResidentBlocks` serves a model loaded whole (small models: fastest). `StreamedBlocks` keeps only
the embedding, final norm and head in memory; each decoder block is built from its tensors when
it runs and freed afterwards, so a model larger than memory can be pruned. Its tensors come from
a `TensorSource`: a GGUF file (read one tensor at a time with pread, dequantized with gguf-py and
transformers' own GGUF tensor processors, so the values equal transformers' whole-model load) or
safetensors shards (`safe_open`, one tensor at a time).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import psutil
import torch
from torch import nn

from . import dequant
from .archs import ArchSpec, blocks, get_path
from .profile import PROFILE, Part
from .plan import Execution


# Whole-model loading by transformers (a Hugging Face folder) holds the checkpoint's tensors and
# the model at once, plus activations; a GGUF's blocks are read and dequantized one tensor at a
# time into their modules (`load_blocks`), so they stay resident with a margin for activations,
# boundary states and one tensor's temporaries.
IN_MEMORY_FACTOR = 3.0
RESIDENT_FACTOR = 1.5


class TensorSource(Protocol):
    def names(self) -> list[str]:
        """Hugging Face parameter names this source provides."""

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One tensor, by its Hugging Face name, as a new torch tensor of `dtype`."""


# Large tensors are dequantized this many values at a time (64 MB of float32 per chunk).
DEQUANTIZE_CHUNK = 16 * 2**20


class GGUFTensors:
    """Tensors of a GGUF file under their Hugging Face names, read one at a time.

    The reader's memory map is used for metadata only (tensor bytes: `read_bytes`). Tensors are
    dequantized on `device` (`dequant.py`), where the blocks run."""

    def __init__(self, path: Path, skeleton: nn.Module, n_blocks: int, device: torch.device = torch.device("cpu")) -> None:
        import gguf
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

        self.path, self.device = Path(path), device  # where tensors are dequantized and returned
        self.reader = gguf.GGUFReader(self.path)
        arch = read_field(self.reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=skeleton.config.to_dict())
        # gguf-py's own name table, built once (transformers' mapper rebuilds it for every submodule).
        names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_blocks)
        by_name = {t.name: t for t in self.reader.tensors}
        self.tensors = {}
        for hf_name in skeleton.state_dict():
            base, _, suffix = hf_name.rpartition(".")
            gguf_name = names.get_name(base)
            if gguf_name is not None and f"{gguf_name}.{suffix}" in by_name:
                self.tensors[hf_name] = by_name[f"{gguf_name}.{suffix}"]

    def names(self) -> list[str]:
        return list(self.tensors)

    def gguf_name(self, name: str) -> str:
        return self.tensors[name].name

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        t = self.tensors[name]
        if dequant.supported(t.tensor_type):
            with PROFILE.part(Part.read):
                raw = read_bytes(self.path, t.data_offset, t.n_bytes)
            values = self._dequantize(raw, t, values_shape(t))
        else:
            values = self._dequantize_numpy(t)
        weights = self.processor.process(weights=values, name=t.name).weights
        with PROFILE.part(Part.copy):
            return weights.to(dtype=dtype, device=self.device)

    def _dequantize(self, raw: torch.Tensor, t, shape: tuple[int, ...]) -> torch.Tensor:
        """Bytes to float32 where the weights will be used (`dequant.py`: gguf-py's arithmetic)."""
        with PROFILE.part(Part.copy):
            raw = raw.to(self.device)
        with PROFILE.part(Part.dequantize, self.device):
            return dequant.dequantize(raw, t.tensor_type, shape)

    def _dequantize_numpy(self, t) -> torch.Tensor:
        """A type `dequant.py` does not know, by gguf-py on the CPU."""
        from gguf import dequantize

        from .runtimes.gguf_prune import read_tensor

        with PROFILE.part(Part.read):
            raw = read_tensor(self.path, t)
        with PROFILE.part(Part.dequantize):
            if raw.ndim == 2 and t.n_elements > DEQUANTIZE_CHUNK:
                # Row by row chunks into one output: gguf-py's dequantization makes several temporaries
                # the size of its output, which for a 7B model's embedding would be gigabytes.
                first = dequantize(raw[:1], t.tensor_type)
                out = np.empty((raw.shape[0], first.shape[1]), dtype=first.dtype)
                step = max(1, DEQUANTIZE_CHUNK // first.shape[1])
                for start in range(0, raw.shape[0], step):
                    out[start : start + step] = dequantize(raw[start : start + step], t.tensor_type)
                return torch.from_numpy(out)
            return torch.from_numpy(np.array(dequantize(raw, t.tensor_type)))

    def rows(self, name: str, indices: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Rows `indices` of a 2-D tensor (an embedding table), reading and dequantizing only those."""
        from gguf import dequantize

        t = self.tensors[name]
        row_bytes = t.n_bytes // t.data.shape[0]
        with PROFILE.part(Part.read), open(self.path, "rb") as f:
            raw = b"".join(os.pread(f.fileno(), row_bytes, t.data_offset + i * row_bytes) for i in indices)
        shape = (len(indices), *values_shape(t)[1:])
        if dequant.supported(t.tensor_type):
            values = self._dequantize(torch.frombuffer(bytearray(raw), dtype=torch.uint8), t, shape)
        else:
            picked = np.frombuffer(raw, dtype=t.data.dtype).reshape(len(indices), *t.data.shape[1:])
            values = torch.from_numpy(np.array(dequantize(picked, t.tensor_type)))
        weights = self.processor.process(weights=values, name=t.name).weights
        return weights.to(dtype=dtype, device=self.device)


def values_shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape in values, numpy order (GGUF lists its dimensions innermost first)."""
    return tuple(int(n) for n in reversed(t.shape))


def read_bytes(path: Path, offset: int, size: int) -> torch.Tensor:
    """`size` bytes of a file at `offset`, with pread into a fresh writable buffer (a uint8 tensor
    over it, no copy): the reader's memory map is left untouched, so the pages of a
    multi-gigabyte file do not pile up in this process's resident memory."""
    buffer = bytearray(size)
    with open(path, "rb") as f:
        view, done = memoryview(buffer), 0
        while done < size:
            got = os.preadv(f.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"{path}: the file ends before its tensor data ({done} of {size} bytes at {offset})")
            done += got
    return torch.frombuffer(buffer, dtype=torch.uint8)


class GatheredEmbedding(nn.Module):
    """A streamed model's input embedding that reads only the rows of the tokens it embeds.

    The table is needed whole only as a head: an untied model's embedding (0.75 GiB in fp32 for a
    7B shape, a third of what its streamed build otherwise holds) is never resident."""

    def __init__(self, tensors: GGUFTensors, name: str, original: nn.Embedding, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.tensors, self.name, self.device, self.dtype = tensors, name, device, dtype
        self.num_embeddings, self.embedding_dim = original.num_embeddings, original.embedding_dim
        # Gemma's scaled embedding multiplies the looked-up rows by sqrt(hidden): kept as it is.
        self.embed_scale = getattr(original, "embed_scale", None)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(input_ids.cpu(), return_inverse=True)
        rows = self.tensors.rows(self.name, unique.tolist(), self.dtype).to(self.device)
        out = rows[inverse.to(self.device)]
        return out if self.embed_scale is None else out * self.embed_scale.to(device=out.device, dtype=out.dtype)


class SafetensorsTensors:
    """Tensors of a Hugging Face folder's safetensors shards, read one at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.shard_of = dict(json.loads(index.read_text())["weight_map"])
        else:
            from safetensors import safe_open

            single = self.folder / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{self.folder} has no model.safetensors or model.safetensors.index.json")
            with safe_open(single, framework="pt") as f:
                self.shard_of = {k: single.name for k in f.keys()}

    def names(self) -> list[str]:
        return list(self.shard_of)

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        from safetensors import safe_open

        with PROFILE.part(Part.read), safe_open(self.folder / self.shard_of[name], framework="pt") as f:
            return f.get_tensor(name).to(dtype)


class BlockStore(Protocol):
    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        """Decoder block `index` (original numbering), ready to run, for the duration."""

    def tensor(self, index: int, dotted: str) -> torch.Tensor:
        """One parameter of block `index` (e.g. "mlp.down_proj.weight"), in the compute dtype."""


class ResidentBlocks:
    """Every block already in memory: the model loaded whole."""

    def __init__(self, model: nn.Module, spec: ArchSpec) -> None:
        self.layers = blocks(model, spec)

    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        yield self.layers[index]

    def tensor(self, index: int, dotted: str) -> torch.Tensor:
        return get_path(self.layers[index], dotted).data


class StreamedBlocks:
    """Blocks built on demand from a tensor source into the skeleton's empty (meta) block modules,
    and emptied again after use."""

    def __init__(self, skeleton: nn.Module, spec: ArchSpec, tensors: TensorSource, device: torch.device, dtype: torch.dtype) -> None:
        self.layers = blocks(skeleton, spec)
        self.tensors, self.device, self.dtype = tensors, device, dtype
        self.prefix = f"{spec.blocks_path}."
        self.loads = 0

    def _name(self, index: int, dotted: str) -> str:
        return f"{self.prefix}{index}.{dotted}"

    @contextmanager
    def block(self, index: int) -> Iterator[nn.Module]:
        layer = self.layers[index]
        state = {k: self.tensors.get(self._name(index, k), self.dtype) for k in layer.state_dict()}
        with PROFILE.part(Part.copy, self.device):
            state = {k: v.to(self.device) for k, v in state.items()}
        layer.load_state_dict(state, assign=True, strict=True)
        self.loads += 1
        try:
            yield layer
        finally:
            layer.to(torch.device("meta"))
            del state
            release_free_memory()

    def tensor(self, index: int, dotted: str) -> torch.Tensor:
        return self.tensors.get(self._name(index, dotted), self.dtype)


def release_free_memory() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim). A streamed pass frees a
    whole block's tensors and dequantization temporaries per block; glibc keeps much of that
    heap otherwise, and a long verification creeps up by hundreds of megabytes."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _libc()


def tensor_source(kind: str, location: str, gguf_file: str | None, skeleton: nn.Module, spec: ArchSpec,
                  device: torch.device = torch.device("cpu")) -> TensorSource:
    if kind == "gguf":
        return GGUFTensors(Path(location) / gguf_file, skeleton, len(blocks(skeleton, spec)), device)
    return SafetensorsTensors(Path(location))


def empty_model(config, dtype: torch.dtype) -> nn.Module:
    """The model's module tree with every parameter on the meta device (no memory), buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_outside_blocks(skeleton: nn.Module, spec: ArchSpec, tensors: TensorSource, device: torch.device, dtype: torch.dtype,
                        gather_embedding: bool = False) -> None:
    """Embedding, final norm and head: loaded once (everything not inside a decoder block).
    `gather_embedding` (streamed GGUF): an untied embedding reads its rows when it runs instead."""
    from accelerate.utils import set_module_tensor_to_device

    prefix = f"{spec.blocks_path}."
    available = set(tensors.names())
    embed = skeleton.get_input_embeddings()
    embed_name = next(n for n, m in skeleton.named_modules() if m is embed) + ".weight"
    tied = getattr(skeleton.config, "tie_word_embeddings", False) and "lm_head.weight" not in available
    gathered = gather_embedding and not tied and isinstance(tensors, GGUFTensors) and embed_name in available
    if gathered:
        skeleton.set_input_embeddings(GatheredEmbedding(tensors, embed_name, embed, device, dtype))
    for name, _ in skeleton.named_parameters():
        if name.startswith(prefix):
            continue
        if name not in available:
            if name == "lm_head.weight":
                continue  # tied to the embedding: set below
            raise KeyError(f"the weights have no tensor {name}")
        set_module_tensor_to_device(skeleton, name, device, value=tensors.get(name, dtype))
    for name, buffer in skeleton.named_buffers():  # rotary inv_freq and the like: built on the CPU by the skeleton
        if not name.startswith(prefix) and not buffer.is_meta and buffer.device != device:
            set_module_tensor_to_device(skeleton, name, device, value=buffer)
    head = skeleton.get_output_embeddings()
    if head is not None and not gathered and (head.weight.is_meta or tied):
        head.weight = embed.weight


def load_blocks(skeleton: nn.Module, spec: ArchSpec, tensors: TensorSource, device: torch.device, dtype: torch.dtype) -> None:
    """Every block resident (the in-memory execution of a source read tensor by tensor)."""
    for index, layer in enumerate(blocks(skeleton, spec)):
        names = {k: f"{spec.blocks_path}.{index}.{k}" for k in layer.state_dict()}
        layer.load_state_dict({k: tensors.get(n, dtype).to(device) for k, n in names.items()}, assign=True, strict=True)


def parameter_bytes(skeleton: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of every parameter in `dtype` (tied tensors once)."""
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(p.numel() for p in skeleton.parameters()) * size


def available_memory(device: torch.device | None = None) -> int:
    """Free bytes where tensors on `device` live: the GPU's own memory for a CUDA device (the
    weights and boundary states go there, however much RAM the host has), else the RAM."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def choose_execution(asked: Execution, model_bytes: int, free_bytes: int, tensor_by_tensor: bool = False) -> Execution:
    """In memory (every block resident, dequantized once) when the model fits comfortably, else
    streamed; `asked` wins. `tensor_by_tensor`: loaded from a GGUF one tensor at a time, which
    needs little beyond the weights themselves."""
    if asked is not Execution.auto:
        return asked
    factor = RESIDENT_FACTOR if tensor_by_tensor else IN_MEMORY_FACTOR
    return Execution.in_memory if model_bytes * factor < free_bytes else Execution.streamed
