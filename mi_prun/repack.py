"""Repack a decision into files: the kept blocks renumbered, the compensation maps folded in.

A loaded model is left as it was (every change is undone after saving), so quality can be
measured before or after repacking alike.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .archs import ArchSpec, Fold
from .blockset import blocks_kept, slice_config
from .compensate import RunCompensation, applied, compensated_weights, replaced


# Shards of the streamed writer: one is written out as soon as it holds this much (what it holds
# is in memory until then).
SHARD_BYTES = 512 * 2**20


def save_checkpoint(loaded, kept: Sequence[int], runs: Sequence[RunCompensation], folder: Path,
                    healed: dict[str, torch.Tensor] | None = None) -> None:
    """A plain transformers checkpoint of the kept blocks with the maps (and healed weights) folded
    in, into `folder`."""
    if loaded.in_memory:
        # The fitted maps go in by original block index, so before the blocks are renumbered.
        with applied(loaded.model, loaded.spec, runs), replaced(loaded.model, healed or {}), \
                blocks_kept(loaded.model, loaded.spec, kept):
            loaded.model.save_pretrained(folder)
    else:
        write_shards(loaded, kept, runs, Path(folder), healed)
    loaded.tokenizer.save_pretrained(folder)


def write_shards(loaded, kept: Sequence[int], runs: Sequence[RunCompensation], folder: Path,
                 healed: dict[str, torch.Tensor] | None = None) -> None:
    """The same checkpoint from a streamed model, tensor by tensor, shard by shard: kept tensors
    copied under their renumbered names, compensated projections (and healed weights) replaced,
    config sliced."""
    from safetensors.torch import save_file

    spec, store = loaded.spec, loaded.runner.store
    prefix = f"{spec.blocks_path}."
    rewritten = {**compensated_weights(spec, runs), **(healed or {})}
    tied = bool(getattr(loaded.model.config, "tie_word_embeddings", False))
    outside = [n for n, _ in loaded.model.named_parameters() if not n.startswith(prefix) and not (tied and n == "lm_head.weight")]
    names = [(n, n) for n in outside]
    for new, old in enumerate(kept):
        names += [(f"{prefix}{old}.{k}", f"{prefix}{new}.{k}") for k in store.layers[old].state_dict()]

    written: list[tuple[Path, list[str]]] = []  # (file, tensor names), in order
    shard: dict[str, torch.Tensor] = {}
    total = size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            file = folder / f"shard-{len(written):05d}.safetensors"
            save_file(shard, file, metadata={"format": "pt"})  # written now: memory holds one shard at most
            written.append((file, list(shard)))
        shard, size = {}, 0

    for source_name, target_name in names:
        tensor = rewritten.get(source_name)
        tensor = store.tensors.get(source_name, loaded.dtype) if tensor is None else tensor.to(loaded.dtype)
        if size and size + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[target_name] = tensor.contiguous()
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    # Shard names carry their count, known only now.
    weight_map = {}
    for k, (file, tensor_names) in enumerate(written):
        final = "model.safetensors" if len(written) == 1 else f"model-{k + 1:05d}-of-{len(written):05d}.safetensors"
        file.rename(folder / final)
        weight_map.update(dict.fromkeys(tensor_names, final))
    if len(written) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = copy.deepcopy(loaded.model.config)
    slice_config(config, spec, kept)
    config.architectures = [type(loaded.model).__name__]  # as save_pretrained writes it (the GGUF converter reads it)
    config.save_pretrained(folder)


def gguf_norm_scale(spec: ArchSpec, weight: torch.Tensor) -> np.ndarray:
    """A norm's weight as GGUF stores it: the scale itself (the family's offset added, as llama.cpp's
    converter does: Gemma's 1 + w)."""
    return weight.float().numpy() + spec.norm_scale_offset


def healed_gguf_tensors(spec: ArchSpec, healed: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Healed weights under their GGUF names (original block indices); a norm's as `gguf_norm_scale`."""
    linear, norms = dict(spec.heal_modules), dict(spec.heal_norms)
    out = {}
    for name, weight in healed.items():
        block, module = spec.block_of(name)
        module = module.removesuffix(".weight")
        if module in linear:
            out[f"blk.{block}.{linear[module]}.weight"] = weight.float().numpy()
        else:
            out[f"blk.{block}.{norms[module]}.weight"] = gguf_norm_scale(spec, weight)
    return out


def compensated_gguf_tensors(spec: ArchSpec, runs: Sequence[RunCompensation]) -> dict[str, np.ndarray]:
    """The weights rewritten by compensation, under their GGUF names (original block indices); a
    norm's (the scale fold) as `gguf_norm_scale`."""
    scale = spec.compensation_fold is Fold.scale
    return {
        f"blk.{r.prev}.{spec.gguf_residual_projection}.weight": gguf_norm_scale(spec, r.weight) if scale else r.weight.float().numpy()
        for r in runs
        if r.weight is not None
    }


def rewritten_weights(loaded, folder: Path, kept: Sequence[int]) -> dict[str, torch.Tensor]:
    """Read back a checkpoint repacked from `loaded` (keeping `kept`): the tensors that differ from
    the loaded model's (compensated or healed), by parameter name in the unpruned model. One tensor
    at a time; a tensor outside the blocks that differs means another model was pruned (refused)."""
    from safetensors import safe_open

    from .errors import UserError

    spec = loaded.spec
    params = dict(loaded.model.named_parameters())
    # A streamed model's blocks (and a gathered embedding) are not in memory: read from the source.
    source = None if loaded.in_memory else loaded.runner.store.tensors
    from_source = set(source.names()) if source is not None else set()

    def reference(name: str) -> torch.Tensor | None:
        if name in from_source:
            return source.get(name, loaded.dtype)
        return params[name].data.cpu() if name in params else None

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no .safetensors weights: give a folder written by `prune` (or build --keep-hf's hf/)")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                inside = spec.block_of(name)
                original = name if inside is None else spec.block_param(kept[inside[0]], inside[1])
                ours = reference(original)
                if ours is None or tuple(ours.shape) != tuple(f.get_slice(name).get_shape()):
                    raise UserError(f"{folder}: tensor {name} has no counterpart of its shape in the reference model; "
                                    "give the model it was pruned from (--reference)")
                value = f.get_tensor(name).to(ours.dtype)
                if torch.equal(value, ours):
                    continue
                if inside is None:
                    raise UserError(f"{folder}: {name} differs from the reference model's; it was pruned from another "
                                    "model (or another quantization): give that one as --reference")
                out[original] = value
    return out
