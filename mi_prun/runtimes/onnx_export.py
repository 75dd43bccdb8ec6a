"""Hugging Face folder -> ONNX with a KV cache for onnxruntime-genai (and plain onnxruntime).

The export is onnxruntime-genai's own model builder (`python -m onnxruntime_genai.models.builder`),
run as a subprocess for the CPU execution provider in fp32 or int4 (weight-only MatMulNBits).
`optimum-onnx` is not an option: it requires transformers < 4.58.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mi_prun.archs import ArchSpec
from mi_prun.errors import UserError, first_line

from .formats import OnnxPrecision
from .gguf_export import spec_of_folder, tool_error_line
from .onnx_builder_compat import builder_config
from .parity import WindowScore

ONNX_MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"


@dataclass(frozen=True)
class Int4Settings:
    """The model builder's weight-only int4 options (its `--extra_options`)."""

    block_size: int = 32  # weights per scale
    accuracy_level: int = 4  # activations of the int4 matmuls: 4 = int8, 1 = fp32
    is_symmetric: bool = True  # int4 (True) or uint4 with zero points (False)
    algo_config: str = "default"  # default / rtn / k_quant
    mixed_precision: str | None = None  # e.g. last_matmul:int8,mixed_layers:int8
    # None: the builder's choice (one matrix for a tied embedding and head). False: the embedding
    # gets its own matrix (asymmetric int4 of a shared matrix does not load in onnxruntime).
    shared_embeddings: bool | None = None
    nodes_to_exclude: str | None = None  # left unquantized, e.g. /lm_head/MatMul
    op_types_to_quantize: str | None = None  # e.g. MatMul/Gather (an embedding of its own quantized too)

    def extra_options(self) -> list[str]:
        out = [f"block_size={self.block_size}", f"accuracy_level={self.accuracy_level}",
               f"is_symmetric={'true' if self.is_symmetric else 'false'}", f"algo_config={self.algo_config}"]
        if self.shared_embeddings is not None:
            out.append(f"shared_embeddings={'true' if self.shared_embeddings else 'false'}")
        if self.nodes_to_exclude:
            out.append(f"nodes_to_exclude={self.nodes_to_exclude}")
        if self.op_types_to_quantize:
            out.append(f"op_types_to_quantize={self.op_types_to_quantize}")
        return out + ([f"matmul_mixed_precision={self.mixed_precision}"] if self.mixed_precision else [])


# Most of what int4 costs is the tied head/embedding in int4 and the most sensitive layers: this keeps
# the embedding a matrix of its own (int4 lookup), the head and llama.cpp's "mixed" layers (first and
# last eighth, every third qkv/v/down) in int8. What these settings cost against fp32 is measured by
# `frontier --target onnx` (reports/frontier_onnx.md, make bench-frontier-onnx).
DEFAULT_INT4 = Int4Settings(shared_embeddings=False, op_types_to_quantize="MatMul/Gather",
                            mixed_precision="last_matmul:int8,mixed_layers:int8")


def check_supported(spec: ArchSpec) -> None:
    if not spec.onnx_genai_supported:
        raise UserError(f"onnxruntime-genai's model builder does not support '{spec.model_type}'; use --target gguf")


def stage_for_builder(folder: Path, cache_dir: Path) -> Path:
    """The folder itself, or a staged copy (files linked, config.json rewritten) when a shim applies."""
    config = json.loads((folder / "config.json").read_text())
    patched = builder_config(config)
    if patched is None:
        return folder
    staged = cache_dir / "staged-input"
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    for f in folder.iterdir():
        if f.name != "config.json":
            (staged / f.name).symlink_to(f.resolve())
    (staged / "config.json").write_text(json.dumps(patched, indent=2))
    return staged


def export_onnx(folder: Path, output: Path, precision: OnnxPrecision, cache_dir: Path, int4: Int4Settings = DEFAULT_INT4) -> None:
    """Run the model builder: `output` becomes an onnxruntime-genai model folder."""
    spec, _ = spec_of_folder(folder)
    check_supported(spec)
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs onnxruntime-genai (with onnx-ir and onnxscript): make install adds them") from None
    source = stage_for_builder(Path(folder), Path(cache_dir))
    cmd = [sys.executable, "-m", "mi_prun.runtimes.onnx_builder_compat", "-i", str(source), "-o", str(output),
           "-p", precision.value, "-e", "cpu", "-c", str(cache_dir),
           # A full-length KV cache on sliding-window layers too: the windowed (ring) cache is
           # only fed correctly by onnxruntime-genai, and plain onnxruntime must run the model.
           "--extra_options", "windowed_kv_cache=false", *(int4.extra_options() if precision is OnnxPrecision.int4 else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[2]))
    if done.returncode != 0 or not (Path(output) / ONNX_MODEL_FILE).is_file():
        raise UserError(f"onnxruntime-genai's model builder failed on {folder}: {tool_error_line(done.stderr + done.stdout, r'Error|error:|Exception|not supported')[:400]}")


@dataclass
class OnnxCheck:
    layers: int  # decoder layers seen through the KV-cache inputs
    inputs: int
    outputs: int
    bytes: int
    genai_loads: bool
    matmul_nbits: int  # int4 weight-only matmuls in the graph


class OnnxSession:
    """Plain onnxruntime over the exported decoder: full-sequence logits with an empty KV cache."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(Path(folder) / ONNX_MODEL_FILE), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise UserError(f"onnxruntime cannot load {folder}: {first_line(err)}") from err
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = sorted((n for n in self.inputs if n.startswith("past_key_values.")), key=_layer_order)
        # The graph leaves the head size symbolic; the builder's genai_config.json states it.
        decoder = json.loads((Path(folder) / GENAI_CONFIG).read_text())["model"]["decoder"]
        self.head_dim = int(decoder["head_size"])

    @property
    def layers(self) -> int:
        return len(self.past) // 2

    def logits(self, tokens: list[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        for name in self.past:
            shape = self.inputs[name].shape  # [batch, kv_heads, past_len, head_dim]
            dtype = np.float16 if "float16" in self.inputs[name].type else np.float32
            feed[name] = np.zeros((1, shape[1], 0, self.head_dim), dtype=dtype)
        return self.session.run(["logits"], feed)[0][0].astype(np.float32)


def _layer_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return int(parts[1]), parts[2]


def count_matmul_nbits(folder: Path) -> int:
    import onnx

    model = onnx.load(str(Path(folder) / ONNX_MODEL_FILE), load_external_data=False)
    return sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")


def folder_bytes(folder: Path) -> int:
    """An export's size on disk: every file under its folder (graph, weights, configs, tokenizer)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def check_onnx(folder: Path, expected_layers: int) -> OnnxCheck:
    """Load the export in plain onnxruntime (count its KV layers) and in onnxruntime-genai."""
    session = OnnxSession(folder)
    if session.layers != expected_layers:
        raise UserError(f"ONNX export {folder} has {session.layers} KV-cache layers, expected {expected_layers}")
    import onnxruntime_genai as og

    try:
        og.Model(str(folder))
    except Exception as err:
        raise UserError(f"onnxruntime-genai cannot load {folder}: {first_line(err)}") from err
    size = folder_bytes(folder)
    return OnnxCheck(session.layers, len(session.inputs), len(session.session.get_outputs()), size, True, count_matmul_nbits(folder))


def genai_greedy(folder: Path, tokens: list[int], new_tokens: int) -> list[int]:
    """Greedy generation of exactly `new_tokens` tokens with onnxruntime-genai (KV cache in use)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    total = len(tokens) + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    generator.append_tokens(list(tokens))
    out = []
    while not generator.is_done() and len(out) < new_tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def onnx_perplexity(folder: Path, windows: np.ndarray) -> float:
    """Perplexity of the export over token windows (n, seq_len), every token but the first predicted."""
    return compare(folder, windows)["ppl"]


def compare(folder: Path, windows: np.ndarray, reference: Path | None = None, kl_windows: int | None = None,
            threads: int | None = None) -> dict:
    """onnxruntime perplexity of an export over token windows (n, seq_len); with a reference export
    (the dense one), also KL(reference || export) and top-1 agreement per predicted token over the
    first `kl_windows` windows (all by default): llama.cpp's comparison (llamacpp.compare) for ONNX."""
    windows = np.asarray(windows)
    kl_windows = len(windows) if kl_windows is None else min(kl_windows, len(windows))
    session = OnnxSession(folder, threads)
    ref = OnnxSession(reference, threads) if reference is not None else None
    score = WindowScore()
    for i, window in enumerate(windows):
        theirs = ref.logits(window) if ref is not None and i < kl_windows else None
        score.add(window, session.logits(window), theirs)
    return score.result()


def _genai_model(og, folder: Path, threads: int | None):
    config = og.Config(str(folder))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def speeds(folders: Sequence[Path], repeats: int = 3, prompt: int = 128, decode: int = 64,
           threads: int | None = None, on_round=None) -> list[dict]:
    """Prefill time of a `prompt`-token prompt and greedy decode speed over `decode` tokens in
    onnxruntime-genai, for every export, side by side as llamacpp.speeds times GGUFs: all loaded,
    warmed up, then timed in turn, round after round. Per export: each round's prefill_ms and
    decode_tok_s."""
    import time

    import onnxruntime_genai as og

    from .llamacpp import timing_prompt

    models = [_genai_model(og, f, threads) for f in folders]
    vocabs = [json.loads((Path(f) / GENAI_CONFIG).read_text())["model"]["vocab_size"] for f in folders]
    runs = [{"prefill_ms": [], "decode_tok_s": []} for _ in folders]

    def generator(model, length):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        return og.Generator(model, params)

    for model, vocab in zip(models, vocabs):  # the first calls allocate buffers and pick kernels
        generator(model, 40).append_tokens(timing_prompt(32, vocab, 1))
    for r in range(repeats):
        for model, vocab, run in zip(models, vocabs, runs):
            tokens = timing_prompt(prompt, vocab, r)
            g = generator(model, prompt + decode + 1)
            start = time.perf_counter()
            g.append_tokens(tokens)
            run["prefill_ms"].append(1000 * (time.perf_counter() - start))
            g.generate_next_token()  # the first token comes from the prompt's logits: decoding starts after it
            first = time.perf_counter()
            for _ in range(decode):
                g.generate_next_token()
            g.get_next_tokens()
            run["decode_tok_s"].append(decode / (time.perf_counter() - first))
        if on_round is not None:
            on_round()
    return runs
