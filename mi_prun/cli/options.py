"""Every command-line option, declared once: its type and help here, its default read from the plan
field it sets (Plan, CalibrationSpec, ExportPlan, EvalPlan, HealPlan), so `--help` and the plan
cannot drift. A command names the options it takes (`takes`); `plans` turns them into a plan."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from ..plan import (DEFAULT_BUILD_RATIO, CalibrationSpec, CompensatedType, Estimator, EvalPlan, ExportPlan, GGUFType, Granularity, HealObjective,
                    HealPlan, HealPrecision, Method, Objective, OnnxPrecision, Plan, RunMap, StateView, Target)

Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Hugging Face folder, hub id, or .gguf file (default: the embedded SmolLM2-135M-Instruct).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (written all at once; an existing one needs --force).")]
Force = Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or messages.")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda, cuda:N.")]
Streamed = Annotated[Optional[bool], typer.Option(
    "--streamed/--in-memory",
    help="Hold one block at a time (models larger than memory) or the whole model; default: whole when it fits comfortably.",
)]
Dtype = Annotated[str, typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16.")]

Remove = Annotated[Optional[int], typer.Option("--remove", "-n", help="Number of blocks to remove.")]
Ratio = Annotated[Optional[float], typer.Option("--ratio", help="Fraction of blocks to remove (instead of --remove).")]
BuildRatio = Annotated[Optional[float], typer.Option("--ratio", help=f"Fraction of blocks to remove (default {DEFAULT_BUILD_RATIO} when neither is given).")]
MethodOpt = Annotated[Method, typer.Option("--method", help="How blocks are chosen.")]
GranularityOpt = Annotated[Granularity, typer.Option(
    "--granularity",
    help="Unit removed: whole blocks, or attention and feed-forward sublayers (Llama family, GGUF only; "
    "--remove N / --ratio R then remove at least that many blocks' worth of bytes).",
)]
LinearAttentionOpt = Annotated[int, typer.Option(
    "--linear-attention",
    min=0,
    help="With --granularity sublayer: replace this many of the attention sublayers the budget keeps by fitted linear maps "
    "(llama.cpp deci's linear attention: no q/k/v weights, no KV cache), those costing least calibration NLL.",
)]
RunMapOpt = Annotated[RunMap, typer.Option(
    "--run-map",
    help="With --granularity sublayer: where each removed run's linear map goes. auto: the form with the lower held-out "
    "error, folded into the kept projection before the run or as a linear map in the deci linear-attention slot of the "
    "run's first attention sublayer (folded with --keep-hf: plain transformers has no such layer); fold: always folded.",
)]
EstimatorOpt = Annotated[Estimator, typer.Option("--estimator", help="MI estimator.")]
ViewOpt = Annotated[StateView, typer.Option("--view", help="State view given to the estimators.")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Fast-Block-Select candidate runs (default 3N).")]
Verify = Annotated[bool, typer.Option("--verify/--no-verify", help="Score differing MI-PRUN proposals by calibration NLL (one pass each).")]
Objectives = Annotated[Optional[list[Objective]], typer.Option(
    "--objective",
    help="MI-PRUN objective form to propose the optimum of (repeat for several; default: channel, per-block, length-penalized).",
)]
Swaps = Annotated[int, typer.Option("--swaps", min=0, help="Single-block swaps of the best MI-PRUN proposal verified per round (0: none).")]

Calib = Annotated[str, typer.Option("--calib", help="Calibration text: .txt/.jsonl/.parquet file, a dataset (wikitext2, PATH[@CONFIG][:SPLIT]), or 'self'.")]
NSamples = Annotated[int, typer.Option("--n-samples", help="Calibration sequences.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sequence.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for calibration sampling, token subsampling and random selection.")]
Compensate = Annotated[bool, typer.Option(
    "--compensate/--no-compensate",
    help="Fold a linear map fitted on the calibration text into the block before each removed run (plain weights, any runtime).",
)]
CompensationSamples = Annotated[Optional[int], typer.Option(
    "--compensation-samples",
    help="Calibration sequences for the compensation fit (default: --n-samples); more fit better, each run costs a pass.",
)]
Heal = Annotated[bool, typer.Option(
    "--heal",
    help="Distil the pruned model toward the dense one (LoRA near each cut, merged into plain weights) before export.",
)]
HealSteps = Annotated[int, typer.Option("--heal-steps", min=1, help="Healing: optimizer steps, at most (per healed block with --heal-objective blocks).")]
HealMinutes = Annotated[float, typer.Option("--heal-minutes", min=0.01, help="Healing: minutes for the whole heal stage (heal text, dense pass, training), at most; training stops at whichever budget ends first.")]
HealReach = Annotated[int, typer.Option("--heal-reach", min=1, help="Healing: adapt the kept blocks within this many blocks of a cut (1: the two beside it). More heals more, but in a GGUF pruned in place every adapted projection is written at 8 bits: the file grows.")]
HealRank = Annotated[int, typer.Option("--heal-rank", min=1, help="Healing: the LoRA adapters' rank. Merged before export, so the file's size does not depend on it; a higher rank trains more parameters (slower steps).")]
HealNorms = Annotated[bool, typer.Option("--heal-norms/--no-heal-norms", help="Healing: train the blocks' norm weights (per-channel scales, float32 in every GGUF: no file growth) with the adapters: every kept block's (objective logits), each healed block's own (blocks). Needs float32 weights (--dtype float32, the CPU default).")]
HealPrecisionOpt = Annotated[HealPrecision, typer.Option("--heal-precision", help="Healing: the student's compute type. auto: bf16 autocast where the device has native bf16 units (CUDA, a CPU with AMX or AVX512-BF16), else fp32.")]
HealObjectiveOpt = Annotated[HealObjective, typer.Option("--heal-objective", help="Healing: what to match. logits: the dense model's next-token distribution through the whole pruned model (needs it in memory); blocks: each healed block's output against the dense state after it, one block in memory at a time (--heal-steps per block); auto: logits in memory, blocks streamed.")]
HealText = Annotated[Optional[str], typer.Option("--heal-text", help="Healing: text to distil on: the forms of --calib, or `python-docs` (Python's own reference documentation), several joined by '+'. Default: the calibration's source joined by Python's documentation when it is a file or dataset (FILE+python-docs: text of the use case heals its domain most, the documentation keeps others); with --calib self, self+python-docs (the model's own text, another seed, and Python's documentation).")]
HealSamples = Annotated[Optional[int], typer.Option("--heal-samples", min=1, help="Healing: windows of 256 tokens to train on, from each source of --heal-text. Default: 64 of self-generated text, 128 of each text read.")]
PlanFile = Annotated[Optional[Path], typer.Option(
    "--plan",
    help="Replay the decision of a pruning.json (or its folder): same blocks, maps fitted again, no scoring. "
    "Works on another quantization of the same model (--model).",
)]

TargetOpt = Annotated[Target, typer.Option("--target", "-t", help="Runtime format: gguf (llama.cpp) or onnx (onnxruntime-genai).")]
GGUFTypeOpt = Annotated[Optional[GGUFType], typer.Option("--gguf-type", help="GGUF tensor type (default: a .gguf input keeps its own quantization, others get q8_0).")]
OnnxPrecisionOpt = Annotated[OnnxPrecision, typer.Option("--onnx-precision", help="ONNX weights: fp32, or int4 weight-only.")]
KeepHF = Annotated[bool, typer.Option("--keep-hf", help="Also keep the repacked Hugging Face checkpoint (in hf/).")]
EvalData = Annotated[Optional[str], typer.Option("--eval", help="Held-out text to measure dense vs pruned quality for the model card (same formats as eval --data).")]
EvalWindows = Annotated[int, typer.Option("--eval-windows", help="Windows of 512 tokens evaluated with --eval.")]
CompensatedTypeOpt = Annotated[CompensatedType, typer.Option(
    "--compensated-type",
    help="GGUF type of the tensors compensation rewrites in a GGUF pruned in place: auto (their own type if 8-bit or more, "
    "else q8_0), same (their own type), q8_0 or f16.",
)]

MaxSize = Annotated[Optional[str], typer.Option(
    "--max-size", help="Budget: largest GGUF to ship (e.g. 64MiB); picks from a measured --frontier.")]
MinSpeedup = Annotated[Optional[float], typer.Option(
    "--min-speedup", help="Budget: decode speed at least this many times the model as given; picks from a measured --frontier.")]
MaxPplIncrease = Annotated[Optional[str], typer.Option(
    "--max-ppl-increase", help="Budget: perplexity at most this much above the model as given (e.g. 10%); picks from a measured --frontier.")]
FrontierDir = Annotated[Optional[Path], typer.Option(
    "--frontier", help="A folder written by `mi-prun-edge frontier`: the budgets pick its best point that meets them, and that file ships.")]


@dataclass(frozen=True)
class Option:
    """One option: its type with typer's declaration, and its default (none: required)."""

    annotation: Any
    default: Any = inspect.Parameter.empty


# The plans whose field defaults are the options' defaults.
PLAN, CALIB, EXPORT, HEAL = Plan(remove=1), CalibrationSpec(), ExportPlan(), HealPlan()
EVAL_WINDOWS = EvalPlan.model_fields["windows"].default

# The options several commands share, by parameter name.
OPTIONS: dict[str, Option] = {
    "out": Option(Out), "force": Option(Force, False), "quiet": Option(Quiet, False),
    "model": Option(Model, None), "device": Option(Device, PLAN.device), "dtype": Option(Dtype, PLAN.dtype),
    "streamed": Option(Streamed, None), "plan_file": Option(PlanFile, None),
    "remove": Option(Remove, None), "ratio": Option(Ratio, None),
    "method": Option(MethodOpt, PLAN.method), "granularity": Option(GranularityOpt, PLAN.granularity),
    "linear_attention": Option(LinearAttentionOpt, PLAN.linear_attention), "run_map": Option(RunMapOpt, PLAN.run_map),
    "estimator": Option(EstimatorOpt, PLAN.estimator), "view": Option(ViewOpt, PLAN.view),
    "calib": Option(Calib, CALIB.source), "n_samples": Option(NSamples, CALIB.n_samples), "seq_len": Option(SeqLen, CALIB.seq_len),
    "seed": Option(Seed, PLAN.seed), "top_k": Option(TopK, PLAN.top_k), "verify": Option(Verify, PLAN.verify),
    "objective": Option(Objectives, None), "swaps": Option(Swaps, PLAN.swaps),
    "compensate": Option(Compensate, PLAN.compensate), "compensation_samples": Option(CompensationSamples, PLAN.compensation_samples),
    "target": Option(TargetOpt, EXPORT.target), "gguf_type": Option(GGUFTypeOpt, EXPORT.gguf_type),
    "compensated_type": Option(CompensatedTypeOpt, EXPORT.compensated_type),
    "onnx_precision": Option(OnnxPrecisionOpt, EXPORT.onnx_precision), "keep_hf": Option(KeepHF, EXPORT.keep_hf),
    "eval_data": Option(EvalData, None), "eval_windows": Option(EvalWindows, EVAL_WINDOWS),
    "heal": Option(Heal, False), "heal_steps": Option(HealSteps, HEAL.steps), "heal_minutes": Option(HealMinutes, HEAL.minutes),
    "heal_samples": Option(HealSamples, HEAL.samples), "heal_reach": Option(HealReach, HEAL.reach),
    "heal_rank": Option(HealRank, HEAL.rank), "heal_norms": Option(HealNorms, HEAL.norms),
    "heal_precision": Option(HealPrecisionOpt, HEAL.precision), "heal_objective": Option(HealObjectiveOpt, HEAL.objective),
    "heal_text": Option(HealText, None),
    "max_size": Option(MaxSize, None), "min_speedup": Option(MinSpeedup, None), "max_ppl_increase": Option(MaxPplIncrease, None),
    "frontier": Option(FrontierDir, None),
}
# The options of the pruning plan, in the order the pruning commands show them.
PRUNING = ("method", "estimator", "view", "calib", "n_samples", "seq_len", "top_k", "verify", "objective", "swaps")
HEALING = ("heal_steps", "heal_minutes", "heal_samples", "heal_reach", "heal_rank", "heal_norms", "heal_precision",
           "heal_objective", "heal_text")


def takes(*params: str | tuple[str, Option]) -> Callable:
    """Give a command `def command(**options)` these options, in this order: a name from OPTIONS,
    or (name, Option) for one of the command's own. Typer reads the signature made here."""
    def with_signature(command: Callable) -> Callable:
        parameters = []
        for param in params:
            name, option = (param, OPTIONS[param]) if isinstance(param, str) else param
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=option.annotation,
                                                default=option.default))
        command.__signature__ = inspect.Signature(parameters)
        return command
    return with_signature
