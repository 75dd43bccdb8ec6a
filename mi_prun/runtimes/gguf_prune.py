"""Remove blocks from a GGUF file without touching the rest: tensors keep their bytes and quantization.

The new file is the old one with the removed blocks' `blk.N.*` tensors left out, the kept blocks
renumbered densely, `{arch}.block_count` set, and every per-layer metadata array (an array under
the architecture's namespace with one entry per block) sliced by the kept indices. llama.cpp's own
`--prune-layers` leaves such arrays stale; here they are found by their length, not by a list of
known keys, and the keys sliced are reported.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import gguf
import numpy as np

from mi_prun.errors import UserError, first_line

# The type a replaced tensor is written in, given its type in the source.
ReplaceType = Callable[[gguf.GGMLQuantizationType], gguf.GGMLQuantizationType]
BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(.+)$")
# Written by GGUFWriter itself, or virtual fields of the reader: never copied.
WRITER_OWNED_PREFIX = "GGUF."


@dataclass(frozen=True)
class GGUFModelInfo:
    path: Path
    arch: str
    block_count: int
    tensor_types: dict[str, int]  # quantization type name -> tensor count
    file_type: int | None


@dataclass(frozen=True)
class KVValue:
    """A metadata value to set: arrays give `sub_type`."""

    value: object
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


@dataclass
class GGUFPruneReport:
    source: Path
    output: Path
    removed: list[int]
    kept: list[int]
    sliced_keys: list[str] = field(default_factory=list)
    set_keys: list[str] = field(default_factory=list)
    tensors_dropped: int = 0
    tensors_written: int = 0
    bytes_written: int = 0
    # Tensors given new values (original names), with the type they were written in.
    replaced: dict[str, str] = field(default_factory=dict)


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A reader for `path`, or one clear error for a missing, truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    stat = path.stat()
    return _reader(path, stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _reader(path: Path, inode: int, size: int, mtime_ns: int) -> gguf.GGUFReader:
    """gguf-py parses every metadata value when it opens a file (a 49k-token vocabulary takes
    seconds), and a build opens its source several times: readers are kept by the file's identity,
    so a file rewritten or replaced is read again."""
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        if _truncated(err):
            raise UserError(
                f"{path} is truncated: it ends ({path.stat().st_size} bytes) before the tensor data its header "
                "describes; copy or download it again"
            ) from err
        raise UserError(f"{path} is not a readable GGUF file (corrupt?): {first_line(err)}") from err


def _truncated(err: Exception) -> bool:
    """gguf-py memory-maps the file and slices each tensor from it: a slice cut short by the end
    of the file cannot take the tensor's shape ("cannot reshape array of size ...")."""
    return isinstance(err, ValueError) and "cannot reshape array" in str(err)


def read_tensor(path: Path, tensor: gguf.ReaderTensor) -> np.ndarray:
    """A tensor's bytes, shaped like the reader's view of them, read with pread into a private
    buffer: the reader's memory map is left untouched, so the pages of a multi-gigabyte file do
    not pile up in this process's resident memory."""
    with open(path, "rb") as f:
        raw = os.pread(f.fileno(), tensor.n_bytes, tensor.data_offset)
    return np.frombuffer(raw, dtype=tensor.data.dtype).reshape(tensor.data.shape)


def field_value(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


def model_info(reader: gguf.GGUFReader, path: Path) -> GGUFModelInfo:
    arch = field_value(reader, gguf.Keys.General.ARCHITECTURE)
    if not arch:
        raise UserError(f"{path} has no general.architecture: not a model GGUF")
    count = field_value(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch))
    if count is None:
        raise UserError(f"{path} has no {arch}.block_count: not a transformer GGUF this tool can prune")
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return GGUFModelInfo(Path(path), arch, int(count), types, field_value(reader, gguf.Keys.General.FILE_TYPE))


def check_arch(info: GGUFModelInfo, supported: Sequence[str]) -> None:
    if info.arch not in supported:
        raise UserError(f"GGUF architecture '{info.arch}' is not supported for pruning; supported: {', '.join(sorted(set(supported)))}")


def _per_layer(field_: gguf.ReaderField, arch: str, n_blocks: int) -> bool:
    return (
        field_.types[0] == gguf.GGUFValueType.ARRAY
        and field_.name.startswith(f"{arch}.")
        and len(field_.data) == n_blocks
    )


def prune_gguf(
    source: Path,
    output: Path,
    removed: Sequence[int],
    supported_archs: Sequence[str] | None = None,
    replace: Mapping[str, np.ndarray] | None = None,
    set_kv: dict[str, KVValue] | None = None,
    replace_type: ReplaceType | None = None,
) -> GGUFPruneReport:
    """Write `output`: `source` without the blocks `removed` (and with the tensors in `replace`
    given new float values, named as in `source`, encoded in `replace_type(their type)` or their own type)."""
    if not removed:
        raise UserError("no blocks to remove")
    return rewrite_gguf(source, output, removed, set_kv, supported_archs, replace, replace_type)


def encode_like(
    values: np.ndarray, original: gguf.ReaderTensor, qtype: gguf.GGMLQuantizationType | None = None
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """`values` (float, the tensor's numpy shape) in `qtype` (default: the original tensor's type),
    or F16 where gguf-py has no quantizer for that type."""
    if tuple(values.shape) != tuple(int(d) for d in reversed(original.shape)):
        raise ValueError(f"{original.name}: new values have shape {values.shape}, the file has {tuple(reversed(original.shape))}")
    qtype = original.tensor_type if qtype is None else qtype
    if qtype == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32), qtype
    try:
        return gguf.quants.quantize(values.astype(np.float32), qtype), qtype
    except NotImplementedError:
        return values.astype(np.float16), gguf.GGMLQuantizationType.F16


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, info: GGUFModelInfo, kept: list[int],
                   set_kv: dict[str, KVValue], report: GGUFPruneReport) -> None:
    """Every key of the source, with the block count and per-layer arrays for the kept blocks, and
    `set_kv` set (replacing a key of the same name, else added)."""
    n = info.block_count
    block_count_key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=info.arch)
    for f in reader.fields.values():
        if f.name.startswith(WRITER_OWNED_PREFIX) or f.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value_type = f.types[0]
        sub_type = f.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        if f.name in set_kv:
            new = set_kv.pop(f.name)
            writer.add_key_value(f.name, new.value, new.type, sub_type=new.sub_type)
            report.set_keys.append(f.name)
            continue
        if f.name == block_count_key:
            value = len(kept)
        elif _per_layer(f, info.arch, n):
            value = [value[i] for i in kept]
            report.sliced_keys.append(f.name)
        writer.add_key_value(f.name, value, value_type, sub_type=sub_type)
    for key, new in set_kv.items():
        writer.add_key_value(key, new.value, new.type, sub_type=new.sub_type)
        report.set_keys.append(key)


def declare_tensors(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, rename: Callable[[str], str | None],
                    replace: dict[str, np.ndarray], replace_type: ReplaceType | None, replaced: dict[str, str]
                    ) -> tuple[list[gguf.ReaderTensor | np.ndarray], int]:
    """The tensors `rename` keeps (it gives a source name its new one, None to drop it), declared
    to the writer; returns what to write for each (a tensor to copy as is, or the new data of a
    replaced one, taken out of `replace` and noted in `replaced` with its type), and how many
    were dropped."""
    written: list[gguf.ReaderTensor | np.ndarray] = []
    dropped = 0
    for t in reader.tensors:
        name = rename(t.name)
        if name is None:
            dropped += 1
            continue
        if t.name in replace:
            data, qtype = encode_like(replace.pop(t.name), t, replace_type(t.tensor_type) if replace_type else None)
            replaced[t.name] = qtype.name
            written.append(data)
        else:
            # Raw bytes and the original type: no dequantize/requantize round trip.
            data, qtype = t.data, t.tensor_type
            written.append(t)
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, qtype)
    return written, dropped


def renumbered(new_index: dict[int, int]) -> Callable[[str], str | None]:
    """Block tensors renamed to their block's new index; those of blocks not in `new_index` dropped."""
    def rename(name: str) -> str | None:
        match = BLOCK_TENSOR.match(name)
        if not match:
            return name
        block = int(match.group(1))
        return f"blk.{new_index[block]}.{match.group(2)}" if block in new_index else None
    return rename


def rewrite_gguf(
    source: Path,
    output: Path,
    removed: Sequence[int] = (),
    set_kv: dict[str, KVValue] | None = None,
    supported_archs: Sequence[str] | None = None,
    replace: Mapping[str, np.ndarray] | None = None,
    replace_type: ReplaceType | None = None,
) -> GGUFPruneReport:
    """Copy `source` to `output` without the blocks `removed` and with the metadata `set_kv` set.

    `set_kv` values describe the model after the removal (they are not sliced). Tensors named in
    `replace` (original names) are encoded from the new values; all others keep their bytes."""
    replace = dict(replace or {})
    set_kv = dict(set_kv or {})
    reader = open_gguf(source)
    info = model_info(reader, source)
    if supported_archs is not None:
        check_arch(info, supported_archs)
    n = info.block_count
    removed_set = set(removed)
    if any(not 0 <= i < n for i in removed_set) or len(removed_set) >= n:
        raise UserError(f"cannot remove blocks {sorted(removed_set)} from a GGUF with {n} blocks")
    kept = [i for i in range(n) if i not in removed_set]
    new_index = {old: new for new, old in enumerate(kept)}
    report = GGUFPruneReport(Path(source), Path(output), sorted(removed_set), kept)

    writer = writer_like(reader, output, info.arch)
    _copy_metadata(reader, writer, info, kept, set_kv, report)
    written, report.tensors_dropped = declare_tensors(reader, writer, renumbered(new_index), replace, replace_type, report.replaced)
    if replace:
        raise ValueError(f"tensors to replace are not in {source} (or belong to removed blocks): {sorted(replace)}")
    report.bytes_written = write_file(writer, reader, Path(source), written)
    report.tensors_written = len(written)
    return report


def writer_like(reader: gguf.GGUFReader, output: Path, arch: str) -> gguf.GGUFWriter:
    """A writer of `arch` with the source's byte order and alignment."""
    writer = gguf.GGUFWriter(str(output), arch, endianess=reader.endianess)
    alignment = field_value(reader, gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = int(alignment)  # tensor offsets must follow the copied key
    return writer


def write_file(writer: gguf.GGUFWriter, reader: gguf.GGUFReader, source: Path, items: list) -> int:
    """Header, metadata, tensor infos, then each tensor's data (a source tensor's bytes read as
    they are, or new data); returns the tensor bytes written."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = 0
    for item in items:
        data = read_tensor(source, item) if isinstance(item, gguf.ReaderTensor) else item
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        total += data.nbytes
    writer.close()
    return total
