"""The architecture registry: everything that differs between supported model families, as data.

Nothing outside this module spells a module path or a config key of a particular architecture.
Adding a family means adding one `ArchSpec` row, not touching the pipeline. Torch-free: the
runtimes and the plan read it without loading a model library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # this table is plain data: importing it must not import torch
    from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's `model_type` has no row in the registry."""


@dataclass(frozen=True)
class GGUFLayerFlag:
    """A per-layer GGUF bool array (under the architecture's namespace) derived from a per-layer
    config list: True where the config entry equals `true_value`. Written by our exporter where
    the converter omits it and llama.cpp would otherwise assume a fixed pattern."""

    config_key: str
    gguf_key: str
    true_value: str


class Fold(str, Enum):
    """How a removed run's compensation map folds into the block before it."""

    matrix = "matrix"  # T^T W into the linear weight whose output is added to the residual stream
    scale = "scale"  # diag(t) into the weight of the norm whose output is added to the residual stream


@dataclass(frozen=True)
class ArchSpec:
    """Where the transformer blocks of one family live and how to renumber them."""

    model_type: str
    # Dotted path from the CausalLM wrapper to the nn.ModuleList of decoder blocks.
    blocks_path: str = "model.layers"
    # Dotted path from the wrapper to the norm applied after the last block.
    final_norm_path: str = "model.norm"
    # Norm at the entrance of each block: the block sees norm(h), never h itself.
    block_input_norm: str = "input_layernorm"
    # Attributes inside a block that hold the block's own index (used by the KV cache).
    layer_index_attrs: tuple[str, ...] = ("self_attn.layer_idx",)
    layer_count_key: str = "num_hidden_layers"
    # The last module of a block whose output is added straight to the residual stream: linear
    # compensation of a removed run folds into its weight, in the form `compensation_fold` says
    # (None: nowhere to fold). GGUF name of the same weight.
    residual_projection: str | None = "mlp.down_proj"
    gguf_residual_projection: str | None = "ffn_down"
    compensation_fold: Fold = Fold.matrix
    # A norm of the family scales by (offset + weight) (Gemma's RMSNorm: 1 + w); GGUF stores the
    # scale itself (llama.cpp's converter adds the offset).
    norm_scale_offset: float = 0.0
    # Linear layers of a block that healing adapts (LoRA, merged before export), with their GGUF
    # names. Not q/k: llama.cpp's converter permutes them for rotary embeddings, so a weight rewritten
    # in place would need the same permutation.
    heal_modules: tuple[tuple[str, str], ...] = (
        ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
    )
    # A block's RMSNorm weights (per-channel scales, float32 in every GGUF), with their GGUF names:
    # healing may train them too (HealPlan.norms). GGUF stores (norm_scale_offset + weight).
    heal_norms: tuple[tuple[str, str], ...] = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"))
    # Config key of a cap applied to the logits after the head (tanh soft-capping), if the family has one.
    logit_softcap_key: str | None = None
    # Config lists with one entry per block: sliced by the kept indices on repack.
    per_layer_config_keys: tuple[str, ...] = ("layer_types",)
    # Architecture names in the export formats (used by runtimes/).
    gguf_arch: str = "llama"
    gguf_layer_flags: tuple[GGUFLayerFlag, ...] = ()
    # Config key of a sliding window that llama.cpp's architecture ignores (outputs differ beyond it).
    gguf_ignored_window_key: str | None = None
    onnx_genai_supported: bool = True
    # Sublayer pruning: the attention's output projection (its output is what attention adds to
    # the residual stream; zeroed, the sublayer adds nothing), and the GGUF architecture llama.cpp
    # runs blocks without some sublayers in (None: the family cannot ship sublayer pruning).
    attention_projection: str = "self_attn.o_proj"
    sublayer_gguf_arch: str | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def block_of(self, name: str) -> tuple[int, str] | None:
        """(block index, name inside the block) of a parameter name; None outside the blocks."""
        prefix = f"{self.blocks_path}."
        if not name.startswith(prefix):
            return None
        block, rest = name.removeprefix(prefix).split(".", 1)
        return int(block), rest

    def block_param(self, block: int, rest: str) -> str:
        """The parameter name of `rest` inside block `block`: the inverse of `block_of`."""
        return f"{self.blocks_path}.{block}.{rest}"


_LLAMA_LIKE = dict(
    blocks_path="model.layers",
    final_norm_path="model.norm",
    block_input_norm="input_layernorm",
)

REGISTRY: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec("llama", gguf_arch="llama", sublayer_gguf_arch="deci", notes="Llama 2/3, SmolLM2", **_LLAMA_LIKE),
        ArchSpec("mistral", gguf_arch="llama", gguf_ignored_window_key="sliding_window", sublayer_gguf_arch="deci", **_LLAMA_LIKE),
        ArchSpec("qwen2", gguf_arch="qwen2", **_LLAMA_LIKE),
        ArchSpec("qwen3", gguf_arch="qwen3", **_LLAMA_LIKE),
        ArchSpec(
            "gemma3_text",
            gguf_arch="gemma3",
            # llama.cpp assumes every 6th layer is global unless this array says otherwise; a pruned
            # (or any non-standard) layer pattern needs it.
            gguf_layer_flags=(GGUFLayerFlag("layer_types", "attention.sliding_window_pattern", "sliding_attention"),),
            # post_feedforward_layernorm follows down_proj: no matrix passes through a norm, but a
            # per-channel scale folds into the norm's own weight.
            residual_projection="post_feedforward_layernorm",
            gguf_residual_projection="post_ffw_norm",
            compensation_fold=Fold.scale,
            norm_scale_offset=1.0,
            heal_norms=(
                ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
                ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
            ),
            logit_softcap_key="final_logit_softcapping",
            notes="per-layer layer_types (sliding/full attention), q/k norms, (1+w) RMSNorm",
            **_LLAMA_LIKE,
        ),
    )
}


def supported_model_types() -> list[str]:
    return sorted(REGISTRY)


def spec_for(model_type: str) -> ArchSpec:
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(supported_model_types())}"
        ) from None


def get_path(root: Any, dotted: str) -> Any:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(root: Any, dotted: str, value: Any) -> None:
    head, _, last = dotted.rpartition(".")
    setattr(get_path(root, head) if head else root, last, value)


def blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    return get_path(model, spec.blocks_path)


def block_count(model: nn.Module, spec: ArchSpec) -> int:
    return len(blocks(model, spec))


def input_norm_of_block(model: nn.Module, spec: ArchSpec, index: int) -> nn.Module:
    """The norm that sees boundary state `index` when it is fed to the next computation.

    Boundary b (0 = embeddings, n = output of the last block) is consumed by block b's input norm,
    or by the final norm when b == n.
    """
    layers = blocks(model, spec)
    if index < len(layers):
        return get_path(layers[index], spec.block_input_norm)
    return get_path(model, spec.final_norm_path)


def read_config(folder: Path) -> dict:
    """A Hugging Face folder's config.json as a dict (no model library involved)."""
    return json.loads((Path(folder) / "config.json").read_text())
