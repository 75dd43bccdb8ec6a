"""The heal plan (build --heal, heal): what a short distillation toward the dense model trains,
on which text, for how long. Torch-free."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from .choices import PYTHON_DOCS, SELF_TEXT, HealObjective, HealPrecision

# The default heal texts and window counts are decisions measured in docs/method.md ("Decisions").
# Where the calibration is self-generated: the model's own text joined by Python's documentation.
SELF_HEAL_TEXT = f"{SELF_TEXT}+{PYTHON_DOCS}"
# Where the user gave text, it is joined by Python's documentation too: the use case's text heals
# its own domain, the documentation keeps other text from being left behind.
TEXT_HEAL_SUFFIX = f"+{PYTHON_DOCS}"
# Windows of each heal source, unless --heal-samples says: reading a text costs nothing but the
# dense pass, so real text gets more windows; self-generated windows cost generation time.
SELF_HEAL_WINDOWS = 64
TEXT_HEAL_WINDOWS = 128


def default_heal_text(calibration_source: str) -> str:
    """--heal-text's default: the calibration's source joined by Python's documentation when the
    user gave real text (text of the use case heals most), else SELF_HEAL_TEXT."""
    if calibration_source == SELF_TEXT:
        return SELF_HEAL_TEXT
    return calibration_source if calibration_source == PYTHON_DOCS else calibration_source + TEXT_HEAL_SUFFIX


def text_sources(source: str) -> tuple[str, ...]:
    """The text sources of a `+`-joined --heal-text. A file whose name holds `+` stays one source:
    from each part on, the longest run of parts that names an existing path is taken whole."""
    parts = source.split("+")
    sources, start = [], 0
    while start < len(parts):
        end = next((end for end in range(len(parts), start + 1, -1)
                    if Path("+".join(parts[start:end])).expanduser().exists()), start + 1)
        sources.append("+".join(parts[start:end]))
        start = end
    return tuple(sources)


class HealPlan(BaseModel):
    """A short distillation of the pruned model toward the dense one (build --heal): LoRA adapters on
    the blocks near each cut, trained on windows of each `source` text, merged before export."""

    model_config = ConfigDict(frozen=True)

    steps: int = Field(300, ge=1)  # optimizer steps, at most (per healed block with the blocks objective)
    minutes: float = Field(10.0, gt=0)  # training time, at most (whichever budget ends first)
    samples: int | None = Field(None, ge=1)  # heal windows of each source (None: windows_of's default)
    seq_len: int = Field(256, ge=8)
    # Text sources joined by `+`; `self`: the model writes it, with a seed other than the
    # calibration's (build --heal passes default_heal_text(calibration source) unless --heal-text is given).
    source: str = SELF_HEAL_TEXT
    # LoRA rank: merged before export, so it costs no file size, only slower steps.
    rank: int = Field(32, ge=1)
    # Kept blocks within this many blocks of a removed one are adapted (1: the two beside each cut).
    # More heals more, but a GGUF pruned in place keeps each adapted projection at 8 bits.
    reach: int = Field(1, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    # Train the blocks' norm weights (per-channel scales, ArchSpec.heal_norms) with the adapters:
    # every kept block's with the logits objective, each healed block's own with the blocks objective.
    norms: bool = True
    batch_windows: int = Field(4, ge=1)  # windows per step
    # The student's forward and backward, and the dense pass over the heal text, run under bfloat16
    # autocast where the device computes it natively (`auto`; heal.training_dtype), else in float32.
    # The adapters, the optimizer, the dense model's final head and log-probabilities and the merged
    # weights stay float32.
    precision: HealPrecision = HealPrecision.auto
    objective: HealObjective = HealObjective.auto

    def sources(self) -> tuple[str, ...]:
        return text_sources(self.source)

    def windows_of(self, source: str) -> int:
        """Heal windows taken from one source: `samples`, else SELF_HEAL_WINDOWS of self-generated
        text and TEXT_HEAL_WINDOWS of real text."""
        if self.samples is not None:
            return self.samples
        return SELF_HEAL_WINDOWS if source == SELF_TEXT else TEXT_HEAL_WINDOWS

    def needs_in_memory(self) -> str | None:
        """What of this heal needs the whole model in memory (None: it heals a streamed model too)."""
        if self.objective is HealObjective.logits:
            return "--heal-objective logits (training runs the whole model)"
        if SELF_TEXT in self.sources():
            return f"self-generated heal text (--heal-text {self.source})"
        return None

    def objective_for(self, in_memory: bool) -> HealObjective:
        """The objective a model loaded this way is healed with."""
        if self.objective is HealObjective.auto:
            return HealObjective.logits if in_memory else HealObjective.blocks
        return self.objective


