"""The heal's training loops: the logits objective (the whole model) and the blocks objective (one block)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..archs import ArchSpec, get_path, set_path
from ..choices import HealPrecision
from ..distill import TeacherTargets, coarse_kl
from ..heal_plan import HealPlan
from ..progress import QUIET, Reporter
from .merge import ADAPTER, merged_weights
from .windows import windows_at_once


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


def block_targets(kept: Sequence[int], chosen: Sequence[int], n_blocks: int) -> dict[int, int]:
    """The dense boundary each healed block's output stands for in the pruned model: the state
    entering the next kept block (past a removed run, the state after it), or the last boundary."""
    return {b: next((k for k in kept if k > b), n_blocks) for b in chosen}


def relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error of a block's output against the dense state, relative to that state's energy,
    over every position but the first (the attention sink, whose state is orders of magnitude larger
    and the same in every window)."""
    output, target = output[:, 1:].float(), target[:, 1:].float()
    return (output - target).pow(2).sum() / target.pow(2).sum()


@dataclass
class HealedBlock:
    """One block healed block-locally (train_block)."""

    weights: dict[str, torch.Tensor]  # merged weights, by name inside the block
    outputs: torch.Tensor  # the healed block's output for every heal window (the next block's input)
    error_before: float  # its output's error against the dense state on every heal window (relative_error)
    error_after: float
    steps: int
    trained_parameters: int
    tokens: int  # tokens trained on (with repeats)


def train_block(runner, spec: ArchSpec, index: int, inputs: torch.Tensor, target: torch.Tensor, fitted: dict[str, torch.Tensor],
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
        with adapters(layer, modules, heal.rank, norms) as params:
            optimizer = torch.optim.AdamW(params, lr=heal.learning_rate, weight_decay=0.0)
            layer.train()
            start = time.perf_counter()
            with reporter.task(label, heal.steps) as advance:
                while len(losses) < heal.steps and time.perf_counter() < deadline:
                    rows = torch.randperm(inputs.shape[0], generator=generator)[: heal.batch_windows]
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(device, dtype):
                        output = apply(inputs[rows])
                    loss = relative_error(output, target[rows].to(device))
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                    tokens += len(rows) * inputs.shape[1]
                    advance(f"relative error {losses[-1]:.4f}, {tokens / (time.perf_counter() - start):.0f} tokens/s")
            layer.eval()
            outputs = outputs_of(apply)  # adapters in place: what the merged block gives
            merged = merged_weights(layer, modules, norms)
        after = float(relative_error(outputs, target.to(device)))
    return HealedBlock(merged, outputs, before, after, len(losses), sum(p.numel() for p in params), tokens)


def autocast(device: torch.device, dtype: torch.dtype):
    """Matrix products in `dtype` where it is bfloat16 (training_dtype), else as they are."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


def train_logits(model, runner, ids: torch.Tensor, teacher: TeacherTargets, params: list, heal: HealPlan, reporter: Reporter,
           deadline: float, dtype: torch.dtype):
    """AdamW on the adapters until the step budget or the `deadline` (perf_counter) ends; per-token
    KL(dense || pruned) over the dense top k and the rest."""
    device = runner.device
    optimizer = torch.optim.AdamW(params, lr=heal.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    micro = min(heal.batch_windows, windows_at_once(model, ids))
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
                    with autocast(device, dtype):
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
def adapters(module, targets: list[str], rank: int, norms: Sequence[str] = ()) -> Iterator[list[torch.nn.Parameter]]:
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


def _remove_adapters(module, targets: list[str]) -> None:
    """Put every adapted layer's original module back (nothing merged into the loaded model), and
    drop peft's record of the adapter, so the same loaded model heals again cleanly (frontier)."""
    for name in targets:
        layer = get_path(module, name)
        if hasattr(layer, "base_layer"):
            set_path(module, name, layer.base_layer)
    if hasattr(module, "peft_config"):
        del module.peft_config
