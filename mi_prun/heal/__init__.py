"""Healing: a short distillation of the pruned model toward the dense one, merged into plain weights.

The pruned model (the kept blocks, compensation folded in) is trained to give the dense model's
next-token distribution on heal text: the loss is KL(dense || pruned) per token over the dense
model's top k tokens and the rest (distill.py). The dense side comes from one dense pass over the
heal windows, its top-k log-probabilities computed once. What trains is a LoRA adapter (peft) on the linear layers
of the kept blocks near each cut (`HealPlan.reach`, `ArchSpec.heal_modules`), with every kept block's
norm weights (`HealPlan.norms`, `ArchSpec.heal_norms`: per-channel scales that re-balance what each
block reads after a cut, float32 in every GGUF), the rest frozen. The adapters are
then merged (W + scale B A) and handed back with the norms as rewritten weights by original block index, so every
exporter writes them as it writes compensated weights, and transformers, llama.cpp and
onnxruntime load the result unchanged.

That objective (`HealObjective.logits`) runs the model's own forward with autograd and needs the
whole model in memory. A streamed model is healed block-locally (`HealObjective.blocks`): the
pruned model is walked one kept block at a time through the block runner, and each block near a cut
is trained to turn the pruned state entering it into the dense state its output stands for (the
state entering the next kept block), its own adapters only, so one block's weights are in memory at
a time. `heal --model PRUNED --reference DENSE` heals a pruned checkpoint written earlier: its
weights that differ from the dense model's are put in place the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..blockset import blocks_kept
from ..choices import HealObjective
from ..compensate import RunCompensation, applied, first_changed, replaced
from ..distill import TEACHER_TOP_K, teacher_targets
from ..heal_plan import HealPlan
from ..manifest import HealInfo
from ..progress import QUIET, Reporter
from ..runner import Windows
from .merge import ADAPTER, fold_healed, merged_weights
from .train import (HealedBlock, adapters, autocast, block_targets, healed_blocks, relative_error, trained_norms, train_block,
                    train_logits, training_dtype)
from .windows import LOGIT_BYTES, heal_windows, windows_at_once

__all__ = ["ADAPTER", "LOGIT_BYTES", "Healed", "HealedBlock", "block_targets", "fold_healed", "heal", "heal_windows", "healed_blocks",
           "relative_error", "trained_norms", "training_dtype"]


@dataclass
class Healed:
    weights: dict[str, torch.Tensor]  # parameter name (original block index) -> merged weight
    info: HealInfo


def heal(loaded, kept: Sequence[int], removed: Sequence[int], runs: Sequence[RunCompensation], heal_plan: HealPlan,
         seed: int = 0, reporter: Reporter = QUIET, rewritten: dict[str, torch.Tensor] | None = None) -> Healed:
    """Train, merge, restore: the loaded model is left as it was; the healed weights come back.
    `rewritten`: weights the pruned model already holds beside `runs`' maps (a pruned checkpoint's
    compensated or healed weights, names of the unpruned model); the dense teacher keeps the originals."""
    objective = heal_plan.objective_for(loaded.in_memory)
    if objective is HealObjective.blocks:
        return _heal_blocks(loaded, kept, removed, runs, heal_plan, seed, reporter, rewritten or {})
    loaded.require_in_memory("--heal-objective logits (training runs the whole model with gradients)")
    model, spec, runner = loaded.model, loaded.spec, loaded.runner
    n = runner.n_blocks
    started = time.perf_counter()
    ids = heal_windows(loaded, heal_plan, seed)
    dtype = training_dtype(heal_plan.precision, runner.device)
    # The dense pass computes in the student's precision (its states and the head stay float32):
    # in bfloat16 it took a third of float32's time on the default model, time the training gets.
    with reporter.task("dense pass over the heal text", n) as advance, autocast(runner.device, dtype):
        final = runner.dense_pass(Windows(ids), keep=lambda b: b == n, on_block=advance).dense[n]
    at_once = windows_at_once(model, ids)
    # A vocabulary-wide head per window: on Gemma 3 (262k) about a second each, so it shows.
    with reporter.task(f"the dense model's top {TEACHER_TOP_K} tokens per position", -(-len(ids) // at_once)) as advance:
        teacher = teacher_targets(runner.logits, final, TEACHER_TOP_K, at_once, advance)
    del final
    chosen = healed_blocks(kept, removed, heal_plan.reach)
    position = {old: new for new, old in enumerate(kept)}
    targets = [spec.block_param(position[b], module) for b in chosen for module, _ in spec.heal_modules]
    block_norms = trained_norms(loaded, heal_plan, reporter)
    # Every kept block's norms, those before the first adapted block too, though their gradient costs
    # backward work of its own (steps 24% slower at N = 4): from the first adapted block on only, the
    # same heal closed less of the gap in more steps (docs/method.md).
    norm_blocks = list(kept) if block_norms else []
    norms = [spec.block_param(position[b], norm) for b in norm_blocks for norm in block_norms]
    torch.manual_seed(seed)
    with applied(model, spec, runs), replaced(model, rewritten or {}), blocks_kept(model, spec, kept), \
            adapters(model, targets, heal_plan.rank, norms) as trained:
        # --heal-minutes bounds the whole stage the user waits for: heal text and dense pass included.
        losses, tokens, steps = train_logits(model, runner, ids, teacher, trained, heal_plan, reporter, started + heal_plan.minutes * 60, dtype)
        weights = {}
        for name, merged in merged_weights(model, targets, norms).items():
            new, module = spec.block_of(name)
            weights[spec.block_param(kept[new], module)] = merged
    info = _info(
        loaded, heal_plan, ids, dtype, started, objective=objective.value, blocks=chosen, norms=block_norms, norm_blocks=norm_blocks,
        trained_parameters=sum(p.numel() for p in trained), steps=steps, tokens=tokens,
        kl_first=round(losses[0], 5) if losses else None, kl_last=round(sum(losses[-10:]) / len(losses[-10:]), 5) if losses else None,
        kl_top_k=teacher.tokens.shape[-1],
    )
    return Healed(weights, info)


def _info(loaded, heal_plan: HealPlan, ids: torch.Tensor, dtype: torch.dtype, started: float, **outcome) -> HealInfo:
    """The manifest's record of a heal: what either objective shares (the plan's settings, the heal
    text, where and how long it ran) and its `outcome`."""
    return HealInfo(
        modules=[m for m, _ in loaded.spec.heal_modules], rank=heal_plan.rank, text=heal_plan.source, windows=len(ids),
        seq_len=heal_plan.seq_len, learning_rate=heal_plan.learning_rate, precision=str(dtype).removeprefix("torch."),
        seconds=round(time.perf_counter() - started, 1), device=str(loaded.runner.device), execution=loaded.execution.value,
        **outcome,
    )


def _heal_blocks(loaded, kept: Sequence[int], removed: Sequence[int], runs: Sequence[RunCompensation], heal_plan: HealPlan,
                 seed: int, reporter: Reporter, rewritten: dict[str, torch.Tensor]) -> Healed:
    """Block-local healing: walk the pruned model one kept block at a time from the first state it
    changes; each block near a cut gets its own adapters, trained to map the pruned state entering
    it onto the dense state its output stands for (`block_targets`), then merged, and the walk goes
    on through the healed block, so the next block trains on what the healed model gives it.
    `--heal-steps` is per healed block here; `--heal-minutes` is shared out among the blocks left."""
    runner, spec = loaded.runner, loaded.spec
    n = runner.n_blocks
    started = time.perf_counter()
    deadline = started + heal_plan.minutes * 60
    changed = first_changed(runs, [spec.block_of(name)[0] for name in rewritten], n)
    targets = block_targets(kept, healed_blocks(kept, removed, heal_plan.reach), n)
    # A block before the first change, not followed by a cut, already gives its dense output from its dense input.
    chosen = [b for b in targets if not (b < changed and targets[b] == b + 1)]
    ids = heal_windows(loaded, heal_plan, seed)
    # Up to here the pruned model computes what the dense one does.
    start = min([changed, *chosen])
    wanted = {start, *(targets[b] for b in chosen)}
    with reporter.task("dense pass over the heal text", max(wanted)) as advance:
        dense = runner.dense_pass(Windows(ids), keep=lambda b: b in wanted, on_block=advance, last=max(wanted)).dense
    dtype = training_dtype(heal_plan.precision, runner.device)
    projections = {r.prev: r.weight for r in runs if r.weight is not None}
    projection = f"{spec.residual_projection}.weight"
    norms = trained_norms(loaded, heal_plan, reporter)
    weights: dict[str, torch.Tensor] = {}
    losses: dict[int, tuple[float, float, int]] = {}  # block -> error on the heal text before, after; steps
    trained = tokens = 0
    h = dense[start]
    with runner.rewriting(rewritten):
        for b in [k for k in kept if start <= k <= max(chosen, default=-1)]:
            if b not in chosen:
                h = runner.run_block(b, h, projections.get(b))
                continue
            left = sum(1 for c in chosen if c >= b)
            block_deadline = time.perf_counter() + (deadline - time.perf_counter()) / left
            fitted = {projection: projections[b]} if b in projections else {}
            label = f"healing block {b} ({chosen.index(b) + 1}/{len(chosen)}): matching the dense state {targets[b]}"
            block = train_block(runner, spec, b, h, dense[targets[b]], fitted, norms, heal_plan, dtype, block_deadline, reporter, label, seed)
            weights.update({spec.block_param(b, name): w for name, w in block.weights.items()})
            h = block.outputs
            trained += block.trained_parameters
            tokens += block.tokens
            losses[b] = (round(block.error_before, 5), round(block.error_after, 5), block.steps)
    info = _info(
        loaded, heal_plan, ids, dtype, started, objective=HealObjective.blocks.value, blocks=chosen, norms=norms,
        norm_blocks=chosen if norms else [], trained_parameters=trained, steps=sum(v[2] for v in losses.values()),
        tokens=tokens, block_loss=losses,
    )
    return Healed(weights, info)
