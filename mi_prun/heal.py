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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .archs import ArchSpec, get_path, set_path
from .blockset import blocks_kept
from .calibration import calibration_batches, text_windows
from .compensate import RunCompensation, applied, compensated_weights, first_changed, replaced
from .distill import TEACHER_TOP_K, TeacherTargets, coarse_kl, teacher_targets
from .manifest import HealInfo
from .plan import SELF_TEXT, CalibrationSpec, HealObjective, HealPlan, HealPrecision
from .progress import QUIET, Reporter
from .runner import Windows

ADAPTER = "heal"
# Bytes of logits a micro-batch may hold: windows x seq_len x vocabulary x 4 bytes, three times over
# (the student's logits, their float32 copy, the gradient); Gemma 3's 262k vocabulary takes one window at a time.
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


def trained_norms(loaded, heal: HealPlan, reporter: Reporter = QUIET) -> list[str]:
    """The norms inside a block whose weights this heal trains: none for a model held in 16 bits,
    where a step of the learning rate is below the resolution of a weight near 1 (bfloat16: 0.008)."""
    if not heal.norms:
        return []
    if loaded.dtype != torch.float32:
        reporter.say(f"healing: norm weights not trained, the model is held in {str(loaded.dtype).removeprefix('torch.')} "
                     "(--dtype float32 trains them; the adapters train either way)")
        return []
    return [norm for norm, _ in loaded.spec.heal_norms]


def heal_windows(loaded, heal: HealPlan, seed: int) -> torch.Tensor:
    """The heal text: `heal.windows_of(source)` windows of each source (self-generated with a seed
    other than the calibration's, a file's or `python-docs`' windows), one after the other."""
    return torch.cat([_source_windows(loaded, heal, source, seed) for source in heal.sources()])


def _source_windows(loaded, heal: HealPlan, source: str, seed: int) -> torch.Tensor:
    wanted = heal.windows_of(source)
    if heal.samples is None and source != SELF_TEXT:
        # The default count of a text read is a ceiling: a shorter text gives the windows it holds.
        return text_windows(loaded, source, wanted, heal.seq_len, at_most=True, what="heal")
    return calibration_batches(loaded, CalibrationSpec(source, wanted, heal.seq_len, seed + 1))


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
    with reporter.task("dense pass over the heal text", n) as advance, _autocast(runner.device, dtype):
        final = runner.dense_pass(Windows(ids), keep=lambda b: b == n, on_block=advance).dense[n]
    at_once = _windows_at_once(model, ids)
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
            _adapters(model, targets, heal_plan.rank, norms) as trained:
        # --heal-minutes bounds the whole stage the user waits for: heal text and dense pass included.
        losses, tokens, steps = _train(model, runner, ids, teacher, trained, heal_plan, reporter, started + heal_plan.minutes * 60, dtype)
        weights = {}
        for name, merged in _merged(model, targets, norms).items():
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


def block_targets(kept: Sequence[int], chosen: Sequence[int], n_blocks: int) -> dict[int, int]:
    """The dense boundary each healed block's output stands for in the pruned model: the state
    entering the next kept block (past a removed run, the state after it), or the last boundary."""
    return {b: next((k for k in kept if k > b), n_blocks) for b in chosen}


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
            block = _train_block(runner, spec, b, h, dense[targets[b]], fitted, norms, heal_plan, dtype, block_deadline, reporter, label, seed)
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


def relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error of a block's output against the dense state, relative to that state's energy,
    over every position but the first (the attention sink, whose state is orders of magnitude larger
    and the same in every window)."""
    output, target = output[:, 1:].float(), target[:, 1:].float()
    return (output - target).pow(2).sum() / target.pow(2).sum()


@dataclass
class HealedBlock:
    """One block healed block-locally (_train_block)."""

    weights: dict[str, torch.Tensor]  # merged weights, by name inside the block
    outputs: torch.Tensor  # the healed block's output for every heal window (the next block's input)
    error_before: float  # its output's error against the dense state on every heal window (relative_error)
    error_after: float
    steps: int
    trained_parameters: int
    tokens: int  # tokens trained on (with repeats)


def _train_block(runner, spec: ArchSpec, index: int, inputs: torch.Tensor, target: torch.Tensor, fitted: dict[str, torch.Tensor],
                 norms: list[str], heal: HealPlan, dtype: torch.dtype, deadline: float, reporter: Reporter, label: str,
                 seed: int) -> HealedBlock:
    """One block's adapters (and its `norms`' weights) trained toward `target` from `inputs` (the
    pruned state entering it), `fitted` (a compensation map) under them."""
    device = runner.device
    modules = [m for m, _ in spec.heal_modules]
    generator = torch.Generator().manual_seed(seed + index)
    torch.manual_seed(seed + index)  # the adapters' initialization: a block heals alike streamed or in memory
    losses: list[float] = []
    tokens = 0

    def outputs_of(apply) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([apply(inputs[rows]) for rows in runner.batches(inputs.shape[0])])

    with runner.open_block(index, fitted) as (layer, apply):
        before = float(relative_error(outputs_of(apply), target.to(device)))
        with _adapters(layer, modules, heal.rank, norms) as params:
            optimizer = torch.optim.AdamW(params, lr=heal.learning_rate, weight_decay=0.0)
            layer.train()
            start = time.perf_counter()
            with reporter.task(label, heal.steps) as advance:
                while len(losses) < heal.steps and time.perf_counter() < deadline:
                    rows = torch.randperm(inputs.shape[0], generator=generator)[: heal.batch_windows]
                    optimizer.zero_grad(set_to_none=True)
                    with _autocast(device, dtype):
                        output = apply(inputs[rows])
                    loss = relative_error(output, target[rows].to(device))
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    tokens += len(rows) * inputs.shape[1]
                    advance(f"relative error {losses[-1]:.4f}, {tokens / (time.perf_counter() - start):.0f} tokens/s")
            layer.eval()
            outputs = outputs_of(apply)  # adapters in place: what the merged block gives
            merged = _merged(layer, modules, norms)
        after = float(relative_error(outputs, target.to(device)))
    return HealedBlock(merged, outputs, before, after, len(losses), sum(p.numel() for p in params), tokens)


def _autocast(device: torch.device, dtype: torch.dtype):
    """Matrix products in `dtype` where it is bfloat16 (training_dtype), else as they are."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def _windows_at_once(model, ids: torch.Tensor) -> int:
    """Windows whose logits fit in LOGIT_BYTES together (at least one)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, LOGIT_BYTES // (ids.shape[1] * vocab * 4 * 3))


def _train(model, runner, ids: torch.Tensor, teacher: TeacherTargets, params: list, heal: HealPlan, reporter: Reporter,
           deadline: float, dtype: torch.dtype):
    """AdamW on the adapters until the step budget or the `deadline` (perf_counter) ends; per-token
    KL(dense || pruned) over the dense top k and the rest."""
    device = runner.device
    optimizer = torch.optim.AdamW(params, lr=heal.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    micro = min(heal.batch_windows, _windows_at_once(model, ids))
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
                    with _autocast(device, dtype):
                        logits = model(input_ids=ids[part].to(device), use_cache=False).logits
                    loss = coarse_kl(logits, teacher[part]) * len(part) / len(rows)
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


@contextmanager
def _adapters(module, targets: list[str], rank: int, norms: Sequence[str] = ()) -> Iterator[list[torch.nn.Parameter]]:
    """LoRA adapters (peft) on the linear layers `targets` (names in `module`) and the weights of the
    norms `norms` trained as they are, everything else frozen, for the duration; yields the trained
    parameters. Afterwards the module is as it was (the norms' weights put back)."""
    from peft import LoraConfig, inject_adapter_in_model

    frozen = {p: p.requires_grad for p in module.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    scales = [get_path(module, norm).weight for norm in norms]
    originals = [w.detach().clone() for w in scales]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    try:
        for w in scales:
            w.requires_grad_(True)
        yield [p for name, p in module.named_parameters() if "lora_" in name] + scales
    finally:
        _remove_adapters(module, targets)
        with torch.no_grad():
            for w, original in zip(scales, originals):
                w.copy_(original)
        for p, flag in frozen.items():
            p.requires_grad_(flag)


def _merged(module, targets: list[str], norms: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Each adapted linear layer's weight with its adapter merged (W + scale B A), and each trained
    norm's weight, by parameter name in `module`."""
    out = {f"{norm}.weight": get_path(module, norm).weight.detach().clone().cpu() for norm in norms}
    for name in targets:
        layer = get_path(module, name)
        with torch.no_grad():
            merged = layer.base_layer.weight.float() + layer.get_delta_weight(ADAPTER).float()
        out[f"{name}.weight"] = merged.to(layer.base_layer.weight.dtype).detach().cpu()
    return out


def _remove_adapters(module, targets: list[str]) -> None:
    """Put every adapted layer's original module back (nothing merged into the loaded model), and
    drop peft's record of the adapter, so the same loaded model heals again cleanly (frontier)."""
    for name in targets:
        layer = get_path(module, name)
        if hasattr(layer, "base_layer"):
            set_path(module, name, layer.base_layer)
    if hasattr(module, "peft_config"):
        del module.peft_config


def fold_healed(runs: list[RunCompensation], weights: dict[str, torch.Tensor], spec: ArchSpec) -> dict[str, torch.Tensor]:
    """A healed residual projection of a compensated block replaces that run's fitted weight (it
    was trained on top of it); the other healed weights are returned, to be written as they are."""
    rest = dict(weights)
    for run in runs:
        name = next(iter(compensated_weights(spec, [run])), None)
        if name in rest:
            run.weight = rest.pop(name)
    return rest
