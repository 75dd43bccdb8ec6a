"""Quality on held-out text: `eval` (a model, optionally against a reference) and `build --eval`
(dense vs pruned, the pruned model being the dense one with blocks skipped and maps folded in)."""

from __future__ import annotations

from pathlib import Path

from typing import Sequence

import torch

from .calibration import canonical_source, read_text_source, tokenize_text
from .compensate import RunCompensation, removal_runs
from .errors import UserError
from . import distributed
from .evaluate import EvalResult, EvalWindows, evaluate, final_states, strided_windows
from .load import LoadedModel, ModelSource
from .manifest import MANIFEST_NAME, PruningManifest, QualityInfo
from .heal_plan import text_sources
from .plan import SELF_TEXT, EvalPlan
from .progress import QUIET, Reporter

# For evaluation a dataset preset means its test split (calibration presets mean validation).
EVAL_PRESETS = {"wikitext2": "wikitext2-test"}


def eval_source(data: str) -> str:
    return EVAL_PRESETS.get(data, data)


def calibration_overlap(model_source: ModelSource, data: str) -> str | None:
    """A warning when `data` is the text the model was calibrated (pruned) or healed on, per its pruning.json."""
    if model_source.kind != "folder" or not (Path(model_source.location) / MANIFEST_NAME).is_file():
        return None
    manifest = PruningManifest.read(Path(model_source.location))
    used = [("calibration", manifest.calibration.source)]
    if manifest.heal is not None:
        used += [("heal", source) for source in text_sources(manifest.heal.text)]
    evaluated = canonical_source(eval_source(data))
    for what, source in used:
        if source != SELF_TEXT and canonical_source(source) == evaluated:
            return (
                f"the evaluation text {data} is the {what} text of this model "
                f"(pruning.json: {source}); these numbers overstate its quality on unseen text"
            )
    return None


def check_windows(seq_len: int, stride: int | None) -> None:
    if seq_len < 2:
        raise UserError("--seq-len must be at least 2 tokens")
    if stride is not None and not 0 < stride <= seq_len:
        raise UserError(f"--stride must lie between 1 and --seq-len ({seq_len}), got {stride}")


def check_same_vocabulary(model: LoadedModel, reference: LoadedModel) -> None:
    if model.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        raise UserError("--reference uses a different tokenizer than --model; KL and top-1 need the same vocabulary")


def _shared(windows: EvalWindows, what: str) -> EvalWindows:
    """This rank's share of the evaluation windows; every rank needs one."""
    if len(windows) < distributed.world():
        raise UserError(f"{what} gives {len(windows)} windows, fewer than one per rank for {distributed.world()} ranks; "
                        "give more text or run fewer ranks")
    return windows.share()


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
    check_windows(seq_len, stride)
    if reference is not None:
        check_same_vocabulary(loaded, reference)
    ids = tokenize_text(loaded.tokenizer, read_text_source(eval_source(data), "evaluation"))
    try:
        windows = _shared(strided_windows(ids, seq_len, stride, max_windows), "evaluation text")
    except ValueError:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}") from None
    loaded.runner.batch_size = batch_size
    with reporter.task(f"evaluating {len(windows)} windows x {seq_len} tokens", loaded.runner.n_blocks) as advance:
        final, _ = final_states(loaded.runner, windows.ids, on_block=advance)
    ref = None
    if reference is not None:
        with reporter.task("running the reference model", reference.runner.n_blocks) as advance:
            ref = (reference.runner, final_states(reference.runner, windows.ids, on_block=advance)[0])
    return evaluate(loaded.runner, final, windows, ref)


def eval_rows(result: EvalResult, tasks: dict | None = None) -> list[tuple[str, str]]:
    """The `eval` table: (metric, value) rows."""
    rows = [("perplexity", f"{result.ppl:.3f}"), ("mean NLL (nats)", f"{result.nll:.4f}")]
    if result.kl is not None:
        rows += [("KL(reference || model) per token (nats)", f"{result.kl:.4f}"), ("top-1 agreement", f"{result.top1:.2%}")]
    rows += [("tokens scored", str(result.tokens)), ("windows", f"{result.windows} x {result.seq_len} (stride {result.stride})"),
             ("wall time (s)", f"{result.wall_s:.1f}")]
    for task, metrics in (tasks or {}).items():
        rows += [(f"{task} {name}", f"{value:.4f}") for name, value in metrics.items()]
    return rows


def measure_quality(loaded: LoadedModel, removed: Sequence[int], runs: Sequence[RunCompensation], evaluation: EvalPlan,
                    reporter: Reporter = QUIET, rewritten: dict[str, torch.Tensor] | None = None,
                    linear_attention: Sequence[int] = ()) -> QualityInfo:
    """Perplexity of dense and pruned, KL and top-1 to dense, on the --eval text. `rewritten`:
    weights the pruned model holds beside its maps (healed; names of the unpruned model), in place
    for the pruned model only: the dense reference keeps the original weights. `linear_attention`:
    blocks whose attention the pruned model runs as a linear map."""
    ids = tokenize_text(loaded.tokenizer, read_text_source(eval_source(evaluation.data), "--eval"))
    try:
        windows = _shared(strided_windows(ids, evaluation.seq_len, max_windows=evaluation.windows), "--eval text")
    except ValueError:
        raise UserError(f"--eval text has {ids.numel()} tokens, fewer than one window of {evaluation.seq_len}") from None
    runner = loaded.runner
    with reporter.task("evaluating dense and pruned on --eval text", runner.n_blocks) as advance:
        pruned_final, dense_final = final_states(runner, windows.ids, removal_runs(removed, runs), advance, rewritten, linear_attention)
    dense = evaluate(runner, dense_final, windows)
    pruned = evaluate(runner, pruned_final, windows, (runner, dense_final))
    return QualityInfo(
        data=evaluation.data, windows=pruned.windows, seq_len=windows.seq_len, tokens=pruned.tokens,
        dense_ppl=dense.ppl, pruned_ppl=pruned.ppl, kl_to_dense=pruned.kl, top1_agreement=pruned.top1,
    )
