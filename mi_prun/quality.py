"""`mi-prun-edge eval`: perplexity of a model on held-out text, KL and top-1 agreement to a reference."""

from __future__ import annotations

from pathlib import Path

from .calibration import canonical_source, read_text_source, tokenize_text
from .errors import UserError
from .evaluate import EvalResult, Reference, evaluate, strided_windows
from .load import LoadedModel, ModelSource
from .manifest import MANIFEST_NAME, PruningManifest
from .progress import QUIET, Reporter

# For evaluation a dataset preset means its test split (calibration presets mean validation).
EVAL_PRESETS = {"wikitext2": "wikitext2-test"}


def eval_source(data: str) -> str:
    return EVAL_PRESETS.get(data, data)


def calibration_overlap(model_source: ModelSource, data: str) -> str | None:
    """A warning when `data` is the text the model was calibrated (pruned) on, per its pruning.json."""
    if model_source.kind != "folder" or not (Path(model_source.location) / MANIFEST_NAME).is_file():
        return None
    calib = PruningManifest.read(Path(model_source.location)).calibration.source
    if calib != "self" and canonical_source(calib) == canonical_source(eval_source(data)):
        return (
            f"the evaluation text {data} is the calibration text this model was pruned on "
            f"(pruning.json: {calib}); these numbers overstate its quality on unseen text"
        )
    return None


def check_same_vocabulary(model: LoadedModel, reference: LoadedModel) -> None:
    if model.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        raise UserError("--reference uses a different tokenizer than --model; KL and top-1 need the same vocabulary")


def run_eval(
    loaded: LoadedModel,
    data: str,
    seq_len: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
    reference: LoadedModel | None = None,
    reporter: Reporter = QUIET,
) -> EvalResult:
    if seq_len < 2:
        raise UserError("--seq-len must be at least 2 tokens")
    if stride is not None and not 0 < stride <= seq_len:
        raise UserError(f"--stride must lie between 1 and --seq-len ({seq_len}), got {stride}")
    if reference is not None:
        check_same_vocabulary(loaded, reference)
    ids = tokenize_text(loaded.tokenizer, read_text_source(eval_source(data)))
    try:
        windows = strided_windows(ids, seq_len, stride, max_windows)
    except ValueError:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}") from None
    ref = Reference(reference.model) if reference is not None else None
    n_batches = -(-len(windows) // batch_size)
    with reporter.task(f"evaluating {len(windows)} windows x {seq_len} tokens", n_batches) as advance:
        return evaluate(loaded.model, windows, ref, batch_size, on_batch=advance)
