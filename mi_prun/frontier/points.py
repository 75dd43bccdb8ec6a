"""What `frontier` builds (FrontierPlan) and what it measured (FrontierPoint, Frontier), and the
Pareto fronts over them. Torch-free: budgets read a frontier in milliseconds."""

from __future__ import annotations

import os
import statistics
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import UserError
from ..plan import ExportPlan, Granularity, HealPlan, OnnxPrecision, Plan, Target

FRONTIER_JSON = "frontier.json"
DEFAULT_RATIOS = (0.0, 0.0625, 0.125, 0.1875, 0.25)
DEFAULT_TYPES = ("f16", "q8_0", "q4_k_m", "q4_0")
ONNX_TYPES = ("fp32", "int4")
RUNTIME = {Target.gguf: "llama.cpp", Target.onnx: "onnxruntime"}
SPEED_RUNTIME = {Target.gguf: "llama.cpp", Target.onnx: "onnxruntime-genai"}


class Build(NamedTuple):
    """A pruned point that is built: blocks removed (blocks' worth of bytes for sublayers), how."""

    n: int
    healed: bool = False
    sublayer: bool = False
    linear: int = 0  # a sublayer point's attention sublayers shipped as fitted linear maps


class FrontierPlan(BaseModel):
    """What `frontier` builds and measures. Every pruned point is `build` with `build`'s choices."""

    model_config = ConfigDict(frozen=True)

    build: Plan  # the build of every pruned point; its remove/ratio is replaced per point
    target: Target = Target.gguf  # the runtime every point is made for and measured in
    removes: tuple[int, ...] | None = None  # blocks removed at each point (0: the model as given)
    ratios: tuple[float, ...] | None = None  # or fractions of the blocks
    gguf_types: tuple[str, ...] = DEFAULT_TYPES  # llama.cpp types every point is quantized to (--target gguf)
    onnx_types: tuple[str, ...] = ONNX_TYPES  # model builder precisions every point is exported at (--target onnx)
    heal_at: tuple[int, ...] = ()  # blocks-removed values also built healed (build.heal's budget)
    sublayer_at: tuple[int, ...] = ()  # blocks-removed values also built with --granularity sublayer (that many blocks' bytes)
    # At each sublayer point, also a build with that many attention sublayers as linear maps (--linear-attention K).
    linear_attention: tuple[int, ...] = ()
    texts: tuple[str, ...]  # held-out texts; the first decides the fronts and carries the KL
    windows: int = Field(24, ge=1)
    seq_len: int = Field(512, ge=16)
    kl_windows: int = Field(8, ge=1)
    speed_repeats: int = Field(3, ge=1)
    prompt_tokens: int = Field(128, ge=1)
    decode_tokens: int = Field(64, ge=2)
    # The long context: the KV cache llama.cpp keeps for it, and decode after a prompt that fills it
    # (attention's cost grows with the context; a layer without attention keeps no cache).
    long_context: int = Field(2048, ge=256)
    # Runtime threads for decode and prompt (llama-cpp-python's own default decodes on half the cores).
    threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "FrontierPlan":
        if (self.removes is None) == (self.ratios is None):
            raise ValueError("give the points as --remove 0,2,4 or as --ratio 0,0.1,0.2, not both")
        if any(r < 0 for r in self.removes or ()) or any(not 0 <= r < 1 for r in self.ratios or ()):
            raise ValueError("blocks removed must be >= 0 and ratios in [0, 1)")
        if not self.texts:
            raise ValueError("give at least one held-out text (--eval)")
        if self.decode_tokens >= self.long_context:
            raise ValueError("the long context must hold more than the decoded tokens")
        if self.sublayer_at and self.target is not Target.gguf:
            raise ValueError("--sublayer-at builds llama.cpp's deci GGUFs: it needs --target gguf")
        if self.linear_attention and not self.sublayer_at:
            raise ValueError("--linear-attention turns a sublayer point's attention sublayers into linear maps: give --sublayer-at too")
        if any(k < 1 for k in self.linear_attention):
            raise ValueError("--linear-attention values must be >= 1 (the sublayer point itself is built without them)")
        return self

    def counts(self, n_blocks: int) -> list[int]:
        """The distinct numbers of blocks removed, checked against the model before any weights load."""
        counts = sorted({*(self.removes or ()), *(round(r * n_blocks) for r in self.ratios or ())} | {0})
        if counts[-1] >= n_blocks:
            raise UserError(f"cannot remove {counts[-1]} of {n_blocks} blocks: at least one must stay")
        for flag, values in (("--heal-at", self.heal_at), ("--sublayer-at", self.sublayer_at)):
            missing = [n for n in values if n not in counts or n == 0]
            if missing:
                raise UserError(f"{flag} {missing}: give only points that are built (removing {counts[1:]} blocks)")
        return counts

    @property
    def types(self) -> tuple[str, ...]:
        return self.gguf_types if self.target is Target.gguf else self.onnx_types

    def builds(self, counts: list[int]) -> list[Build]:
        """The pruned points that are built (0 removed is the model as given)."""
        return ([Build(n) for n in counts if n > 0] + [Build(n, healed=True) for n in counts if n in self.heal_at]
                + [Build(n, sublayer=True, linear=k) for n in counts if n in self.sublayer_at
                   for k in (0, *sorted(set(self.linear_attention)))])

    def point_plan(self, build: Build) -> Plan:
        # An ONNX point is built at fp32 with its checkpoint kept: the other precisions are exported from it.
        export = ExportPlan(target=Target.gguf) if self.target is Target.gguf else \
            ExportPlan(target=Target.onnx, onnx_precision=OnnxPrecision.fp32, keep_hf=True)
        return self.build.model_copy(update={
            "remove": build.n, "ratio": None, "heal": (self.build.heal or HealPlan()) if build.healed else None,
            "granularity": Granularity.sublayer if build.sublayer else Granularity.block, "linear_attention": build.linear,
            "export": export, "evaluation": None})


def point_name(build: Build) -> str:
    """The folder of a built point."""
    return (f"remove-{build.n}" + ("-healed" if build.healed else "") + ("-sublayer" if build.sublayer else "")
            + (f"-linear{build.linear}" if build.linear else ""))


class Stats(BaseModel):
    """Repeated timings: median (min-max) and every run."""

    model_config = ConfigDict(frozen=True)

    median: float
    min: float
    max: float
    runs: list[float]

    @classmethod
    def of(cls, values: list[float]) -> "Stats":
        return cls(median=statistics.median(values), min=min(values), max=max(values), runs=list(values))


class FrontierPoint(BaseModel):
    """One blocks-removed x type point, as measured in its runtime (frontier.json keeps these keys)."""

    model_config = ConfigDict(frozen=True)

    removed_blocks: int  # blocks removed, or for a sublayer point that many blocks' worth of bytes
    removed: list[int]  # the blocks gone entirely
    healed: bool
    file: str  # relative to the frontier folder, or the model as given
    type: str
    build: dict[str, float] | None  # the build's stage timings (None: the model as given)
    ppl: dict[str, float]  # per held-out text
    kl_to_dense: float
    top1_agreement: float
    ppl_primary: float
    bytes: int
    prefill_ms: Stats
    decode_tok_s: Stats
    granularity: Granularity = Granularity.block
    removed_sublayers: list[str] | None = None  # a sublayer point's removed units (12.attention, 12.ffn, ...)
    linear_attention: list[int] | None = None  # blocks whose attention ships as a fitted linear map (no KV cache)
    kv_cache_bytes: int | None = None  # llama.cpp's KV cache at the plan's long context (None: not measured)
    decode_tok_s_long: Stats | None = None  # decode after a prompt filling the long context
    speedup: float = 1.0  # decode speed over the model as given
    ppl_increase: float = 0.0  # perplexity on the first text over the model as given, minus 1
    on_size_front: bool = False
    on_speed_front: bool = False
    on_long_speed_front: bool = False  # the front of quality against decode speed at the long context

    @property
    def label(self) -> str:
        unit = "blocks' worth of sublayers" if self.granularity is Granularity.sublayer else "removed"
        linear = f" with {len(self.linear_attention)} linear attentions" if self.linear_attention else ""
        return f"{self.removed_blocks} {unit}{linear}{' healed' if self.healed else ''}, {self.type}"


class Frontier(BaseModel):
    """A measured frontier: frontier.json."""

    model_config = ConfigDict(frozen=True)

    command: str | None
    model: str
    default_model: bool
    target: str
    runtime: str
    speed_runtime: str
    reference: str
    n_blocks: int
    source_type: str | None
    plan: dict
    primary_text: str
    eval: dict[str, str]
    kl: str
    speed: str
    long_speed: str | None = None  # how decode at the long context and the KV cache were measured (llama.cpp)
    machine: str
    points: list[FrontierPoint]
    contention: dict
    timing_contention: dict


def pareto(points: list[FrontierPoint], better_x) -> list[bool]:
    """Whether each point is on the front of quality (lower ppl is better) against an axis where
    `better_x(a, b)` says a is at least as good as b; ties on both count as not beaten."""
    def beats(q: FrontierPoint, p: FrontierPoint) -> bool:
        return q.ppl_primary <= p.ppl_primary and better_x(q, p) and (q.ppl_primary < p.ppl_primary or not better_x(p, q))

    return [not any(beats(q, p) for q in points if q is not p) for p in points]


def with_fronts(points: list[FrontierPoint]) -> list[FrontierPoint]:
    """The points against the first (the model as given): speedup, perplexity increase, fronts marked."""
    as_given = points[0]
    points = [p.model_copy(update={"speedup": p.decode_tok_s.median / as_given.decode_tok_s.median,
                                   "ppl_increase": p.ppl_primary / as_given.ppl_primary - 1}) for p in points]
    size = pareto(points, lambda a, b: a.bytes <= b.bytes)
    speed = pareto(points, lambda a, b: a.decode_tok_s.median >= b.decode_tok_s.median)
    long = [False] * len(points)
    if all(p.decode_tok_s_long is not None for p in points):
        long = pareto(points, lambda a, b: a.decode_tok_s_long.median >= b.decode_tok_s_long.median)
    return [p.model_copy(update={"on_size_front": s, "on_speed_front": f, "on_long_speed_front": g})
            for p, s, f, g in zip(points, size, speed, long)]
