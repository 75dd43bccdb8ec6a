"""Healing: a short distillation of the pruned model toward the dense one, merged into plain weights.

The pruned model (the kept blocks, compensation folded in) is trained to give the dense model's
next-token distribution on heal text: the loss is KL(dense || pruned) per token. The dense side
comes from one dense pass over the heal windows (its final states are kept; their logits are
recomputed per step, a head's matmul). What trains is a LoRA adapter (peft) on the linear layers
of the kept blocks near each cut (`HealPlan.reach`, `ArchSpec.heal_modules`), the rest frozen. The adapters are
then merged (W + scale B A) and handed back as rewritten weights by original block index, so every
exporter writes them as it writes compensated weights, and transformers, llama.cpp and
onnxruntime load the result unchanged.

Training runs the model's own forward with autograd (the block runner is inference only) and
needs the whole model in memory. `heal --model PRUNED --reference DENSE` heals a pruned checkpoint
written earlier: its weights that differ from the dense model's are put in place the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .archs import ArchSpec, get_path, set_path
from .blockset import blocks_kept
from .calibration import calibration_batches
from .compensate import RunCompensation, applied, compensated_weights, replaced
from .manifest import HealInfo
from .plan import CalibrationSpec, HealPlan, HealPrecision
from .progress import QUIET, Reporter
from .runner import Windows

ADAPTER = "heal"
# Bytes of logits a micro-batch may hold: windows x seq_len x vocabulary x 4 bytes, three times over
# (teacher, student, gradient); Gemma 3's 262k vocabulary takes one window at a time.
LOGIT_BYTES = 1536 * 2**20


@dataclass
class Healed:
    weights: dict[str, torch.Tensor]  # parameter name (original block index) -> merged weight
    info: HealInfo


def training_dtype(precision: HealPrecision, device: torch.device) -> torch.dtype:
    """bfloat16 where the device has native bf16 matrix units: CUDA that supports it, a CPU with
    AMX or AVX512-BF16 (on this project's 2-core Xeon a 1024-token LoRA linear's forward and
    backward took 7.1 ms against 27.7 ms in float32, a whole heal step about half the time);
    float32 elsewhere, where emulated bf16 is slower than float32."""
    if precision is HealPrecision.fp32:
        return torch.float32
    if precision is HealPrecision.bf16:
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return torch.bfloat16 if native else torch.float32


def healed_blocks(kept: Sequence[int], removed: Sequence[int], reach: int = 1) -> list[int]:
    """The kept blocks within `reach` blocks of a removed one (original indices); `reach` 1: the
    block before each removed run and the one after."""
    return [i for i in kept if any(abs(i - r) <= reach for r in removed)]


def heal_windows(loaded, heal: HealPlan, seed: int) -> torch.Tensor:
    """The heal text: self-generated with a seed other than the calibration's, or a file's windows."""
    return calibration_batches(loaded, CalibrationSpec(heal.source, heal.samples, heal.seq_len, seed + 1))


def heal(loaded, kept: Sequence[int], removed: Sequence[int], runs: Sequence[RunCompensation], heal_plan: HealPlan,
         seed: int = 0, reporter: Reporter = QUIET, rewritten: dict[str, torch.Tensor] | None = None) -> Healed:
    """Train, merge, restore: the loaded model is left as it was; the healed weights come back.
    `rewritten`: weights the pruned model already holds beside `runs`' maps (a pruned checkpoint's
    compensated or healed weights, names of the unpruned model); the dense teacher keeps the originals."""
    loaded.require_in_memory("--heal (training runs the whole model with gradients)")
    from peft import LoraConfig, inject_adapter_in_model

    model, spec, runner = loaded.model, loaded.spec, loaded.runner
    n = runner.n_blocks
    started = time.perf_counter()
    ids = heal_windows(loaded, heal_plan, seed)
    with reporter.task("dense pass over the heal text", n) as advance:
        teacher = runner.dense_pass(Windows(ids), keep=lambda b: b == n, on_block=advance).dense[n]
    chosen = healed_blocks(kept, removed, heal_plan.reach)
    dtype = training_dtype(heal_plan.precision, runner.device)
    position = {old: new for new, old in enumerate(kept)}
    targets = [spec.block_param(position[b], module) for b in chosen for module, _ in spec.heal_modules]
    torch.manual_seed(seed)
    with applied(model, spec, runs), replaced(model, rewritten or {}), blocks_kept(model, spec, kept):
        frozen = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=heal_plan.rank, lora_alpha=2 * heal_plan.rank, lora_dropout=0.0, target_modules=targets)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        try:
            trained = [p for name, p in model.named_parameters() if "lora_" in name]
            # --heal-minutes bounds the whole stage the user waits for: heal text and dense pass included.
            losses, tokens, steps = _train(model, runner, ids, teacher, trained, heal_plan, reporter, started + heal_plan.minutes * 60, dtype)
            weights = _merged(model, spec, targets, kept)
        finally:
            _remove_adapters(model, targets)
            for p, flag in frozen.items():
                p.requires_grad_(flag)
    info = HealInfo(
        blocks=chosen, modules=[m for m, _ in spec.heal_modules], rank=heal_plan.rank, trained_parameters=sum(p.numel() for p in trained),
        text=heal_plan.source, windows=heal_plan.samples, seq_len=heal_plan.seq_len, steps=steps, tokens=tokens,
        learning_rate=heal_plan.learning_rate, precision=str(dtype).removeprefix("torch."), seconds=round(time.perf_counter() - started, 1),
        kl_first=round(losses[0], 5) if losses else None, kl_last=round(sum(losses[-10:]) / len(losses[-10:]), 5) if losses else None,
    )
    return Healed(weights, info)


def _train(model, runner, ids: torch.Tensor, teacher: torch.Tensor, params: list, heal: HealPlan, reporter: Reporter,
           deadline: float, dtype: torch.dtype):
    """AdamW on the adapters until the step budget or the `deadline` (perf_counter) ends; per-token KL(dense || pruned)."""
    device = runner.device
    optimizer = torch.optim.AdamW(params, lr=heal.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    micro = max(1, min(heal.batch_windows, LOGIT_BYTES // (ids.shape[1] * vocab * 4 * 3)))
    losses: list[float] = []
    tokens = steps = 0
    start = time.perf_counter()
    model.train()
    try:
        with reporter.task("healing: distilling toward the dense model", heal.steps) as advance:
            while steps < heal.steps and time.perf_counter() < deadline:
                rows = torch.randperm(ids.shape[0], generator=generator)[: heal.batch_windows]
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for part in rows.split(micro):
                    with torch.no_grad():
                        target = F.log_softmax(runner.logits(teacher[part].reshape(-1, teacher.shape[-1])), dim=-1)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                        logits = model(input_ids=ids[part].to(device), use_cache=False).logits.float()
                    student = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
                    loss = F.kl_div(student, target, log_target=True, reduction="batchmean") * len(part) / len(rows)
                    loss.backward()
                    step_loss += float(loss.detach())
                optimizer.step()
                steps += 1
                tokens += int(len(rows) * ids.shape[1])
                losses.append(step_loss)
                advance(f"KL {step_loss:.4f}, {tokens / (time.perf_counter() - start):.0f} tokens/s")
    finally:
        model.eval()
    return losses, tokens, steps


def _merged(model, spec: ArchSpec, targets: list[str], kept: Sequence[int]) -> dict[str, torch.Tensor]:
    """Each adapted weight with its adapter merged, by its parameter name in the unpruned model."""
    out = {}
    for name in targets:
        layer = get_path(model, name)
        with torch.no_grad():
            merged = layer.base_layer.weight.float() + layer.get_delta_weight(ADAPTER).float()
        new, module = spec.block_of(name)
        out[spec.block_param(kept[new], f"{module}.weight")] = merged.to(layer.base_layer.weight.dtype).detach().cpu()
    return out


def _remove_adapters(model, targets: list[str]) -> None:
    """Put every adapted layer's original module back (nothing merged into the loaded model), and
    drop peft's record of the adapter, so the same loaded model heals again cleanly (frontier)."""
    for name in targets:
        layer = get_path(model, name)
        if hasattr(layer, "base_layer"):
            set_path(model, name, layer.base_layer)
    if hasattr(model, "peft_config"):
        del model.peft_config


def fold_healed(runs: list[RunCompensation], weights: dict[str, torch.Tensor], spec: ArchSpec) -> dict[str, torch.Tensor]:
    """A healed residual projection of a compensated block replaces that run's fitted weight (it
    was trained on top of it); the other healed weights are returned, to be written as they are."""
    rest = dict(weights)
    for run in runs:
        name = next(iter(compensated_weights(spec, [run])), None)
        if name in rest:
            run.weight = rest.pop(name)
    return rest
