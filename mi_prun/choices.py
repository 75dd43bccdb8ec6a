"""The choices of a run that name a method, not a quantity: enums the plan, the CLI and the
manifest share. Torch-free."""

from __future__ import annotations

from enum import Enum

# Text sources named rather than read from a path: text the model writes for itself from seeded
# prompts, and the reference topics of Python's own documentation (`pydoc_data`, in the standard
# library: technical English wherever this tool runs, with no data or network).
SELF_TEXT = "self"
PYTHON_DOCS = "python-docs"



class HealPrecision(str, Enum):
    """The student's compute type while healing."""

    auto = "auto"  # bf16 where the device computes it natively (heal.training_dtype), else fp32
    bf16 = "bf16"
    fp32 = "fp32"


class HealObjective(str, Enum):
    """What healing matches to the dense model."""

    auto = "auto"  # logits for a model in memory, blocks for a streamed one
    logits = "logits"  # next-token distribution, KL through the whole pruned model (needs it in memory)
    blocks = "blocks"  # each healed block's output state, one block at a time (streamable)


class Granularity(str, Enum):
    """The unit a run removes: whole blocks, or attention and feed-forward sublayers (`sublayers.py`)."""

    block = "block"
    sublayer = "sublayer"


class RunMap(str, Enum):
    """Where a removed run of sublayers gets its linear map (`sublayer_maps.py`)."""

    # Each run's map in the form with the lower held-out error: folded into the kept sublayer's
    # projection before the run, or a linear map of the normed stream in deci's linear-attention
    # slot of the run's first attention sublayer. Folded only where a plain-transformers
    # checkpoint is written (prune, build --keep-hf): transformers has no linear-attention layer.
    auto = "auto"
    fold = "fold"  # always folded into the projection before the run


class Method(str, Enum):
    mi_prun = "mi-prun"
    mi_prun_exact = "mi-prun-exact"
    shortgpt = "shortgpt"
    angular = "angular"
    sleb = "sleb"
    ppl = "ppl"
    random = "random"


class Estimator(str, Enum):
    """`token`: per-token Gaussian channel (default). `gaussian`, `renyi`: across the token population."""

    token = "token"
    gaussian = "gaussian"
    renyi = "renyi"


class Objective(str, Enum):
    """Forms of the MI-PRUN objective whose optima are proposed (`methods.propose`).

    channel: a run costs its measured lost fraction exp(-2 I(h_{i-1}; h_j)) (favours one long run);
    per_block: a run costs the sum of its blocks' lost fractions (no interaction, one-shot);
    length: the run's lost fraction times its length (between the two);
    compensated: a run costs what its fitted linear map cannot recover (`recovery.py`), i.e. the
    removal the tool ships (only where compensation is on).
    """

    channel = "channel"
    per_block = "per-block"
    length = "length-penalized"
    compensated = "compensated"


# Not the compensated form by default: measured on SmolLM2-135M it wins some budgets and texts and
# loses others (docs/method.md, "The compensated objective").
DEFAULT_OBJECTIVES = (Objective.channel, Objective.per_block, Objective.length)


class StateView(str, Enum):
    """What the estimators see of a state: as captured, or RMS-normalized per token.

    Per-token RMS normalization removes the norm growth with depth; the per-token estimator and
    cosine are invariant to it, the population estimators are not.
    """

    raw = "raw"
    rms = "rms"


class Execution(str, Enum):
    """How the model's weights are held while it runs: whole, or one block at a time."""

    auto = "auto"
    in_memory = "in-memory"
    streamed = "streamed"


