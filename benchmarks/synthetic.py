"""Seeded random-weight Llama-shaped models at chosen sizes, as a Q4_0 GGUF or as safetensors
shards, for the scale benchmark: quality means nothing on them, memory and time do.

Weights are written tensor by tensor (never the whole model in memory). The GGUF's Q4_0 blocks
are random 4-bit codes with one fixed scale (weights of std about 0.02), so a 7B-shaped file is
written in seconds; the tokenizer is the default model's (SmolLM2, 49152 tokens), copied from its
GGUF so that the tool and llama.cpp can tokenize text for it.

    python benchmarks/synthetic.py --shape 7b --format gguf --out out/synthetic/llama-7b.Q4_0.gguf
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

from mi_prun.load import default_model_path

WEIGHT_STD = 0.02
Q4_0_BLOCK = 32  # weights per Q4_0 block: an f16 scale and 16 bytes of 4-bit codes


@dataclass(frozen=True)
class Shape:
    hidden: int
    ffn: int
    blocks: int
    heads: int
    kv_heads: int
    vocab: int = 49152

    def tensors(self) -> list[tuple[str, str, tuple[int, int] | tuple[int]]]:
        """(GGUF name, Hugging Face name, (rows, cols) or (n,)) of every tensor, in file order."""
        h, f, head_dim = self.hidden, self.ffn, self.hidden // self.heads
        out = [("token_embd.weight", "model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.blocks):
            p = f"model.layers.{i}."
            out += [
                (f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", (h,)),
                (f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", (h, h)),
                (f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", (self.kv_heads * head_dim, h)),
                (f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (self.kv_heads * head_dim, h)),
                (f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (h, h)),
                (f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", (h,)),
                (f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (f, h)),
                (f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (f, h)),
                (f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (h, f)),
            ]
        out += [("output_norm.weight", "model.norm.weight", (h,)), ("output.weight", "lm_head.weight", (self.vocab, h))]
        return out

    def parameters(self) -> int:
        return sum(int(np.prod(s)) for _, _, s in self.tensors())


SHAPES = {
    "0.3b": Shape(hidden=1024, ffn=2816, blocks=16, heads=16, kv_heads=8),
    "1b": Shape(hidden=2048, ffn=5632, blocks=20, heads=16, kv_heads=8),
    "3b": Shape(hidden=3072, ffn=8192, blocks=26, heads=24, kv_heads=8),
    "7b": Shape(hidden=4096, ffn=11008, blocks=32, heads=32, kv_heads=32),  # Llama-2-7B's shape
}


def random_q4_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Q4_0 bytes of a (rows, cols) matrix: random codes, one scale giving std ~ WEIGHT_STD."""
    blocks = rows * cols // Q4_0_BLOCK
    data = np.empty((blocks, 18), dtype=np.uint8)
    # Codes uniform on 0..15 stand for -8..7 (std ~4.6) times the scale.
    data[:, :2] = np.frombuffer(np.float16(WEIGHT_STD / 4.6).tobytes(), dtype=np.uint8)
    data[:, 2:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return data.reshape(rows, cols // Q4_0_BLOCK * 18)


def tokenizer_fields(reader: gguf.GGUFReader):
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            yield field


def write_gguf(shape: Shape, out: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    source = gguf.GGUFReader(str(default_model_path()))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(f"synthetic-llama-{shape.parameters() / 1e9:.1f}b")
    writer.add_context_length(4096)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.blocks)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    for field in tokenizer_fields(source):
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    specs = shape.tensors()
    for name, _, dims in specs:
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * 4)
        else:
            rows, cols = dims
            nbytes = rows * cols // Q4_0_BLOCK * 18
            writer.add_tensor_info(name, (rows, cols // Q4_0_BLOCK * 18), np.dtype(np.uint8), nbytes, gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, dims in specs:  # one tensor in memory at a time
        writer.write_tensor_data(np.ones(dims, dtype=np.float32) if len(dims) == 1 else random_q4_0(rng, *dims))
    writer.close()


def write_safetensors(shape: Shape, out: Path, seed: int, shard_bytes: int = 2 * 2**30) -> None:
    """bf16 shards (the usual hub layout), config.json and the default model's tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []
    size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            save_file(shard, out / f"part-{len(files)}.safetensors", metadata={"format": "pt"})
            files.append(list(shard))
        shard, size = {}, 0

    for _, hf_name, dims in shape.tensors():
        t = torch.ones(dims) if len(dims) == 1 else torch.randn(dims, generator=generator) * WEIGHT_STD
        t = t.to(torch.bfloat16)
        if size + t.nbytes > shard_bytes:
            flush()
        shard[hf_name] = t
        size += t.nbytes
    flush()
    weight_map = {}
    for k, names in enumerate(files):
        final = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        (out / f"part-{k}.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.blocks,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    config.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path().parent), gguf_file=default_model_path().name)
    tokenizer.save_pretrained(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--format", choices=["gguf", "safetensors"], default="gguf")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (write_gguf if args.format == "gguf" else write_safetensors)(shape, args.out, args.seed)
    print(json.dumps({"out": str(args.out), "parameters": shape.parameters(), **asdict(shape)}))


if __name__ == "__main__":
    main()
