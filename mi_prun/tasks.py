"""Zero-shot multiple-choice tasks through lm-evaluation-harness (the optional `tasks` extra)."""

from __future__ import annotations

from .errors import UserError, first_line
from .load import LoadedModel

INSTALL_HINT = "pip install 'mi-prun-edge[tasks]' (lm-eval)"


def require_lm_eval() -> None:
    """Checked before any model is loaded, so a missing extra costs the user no wait."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from None


def run_tasks(loaded: LoadedModel, tasks: list[str], limit: int | None = None, batch_size: int = 4) -> dict[str, dict[str, float]]:
    """Scores per task (e.g. {'arc_easy': {'acc,none': 0.61, ...}}) for the already loaded model."""
    require_lm_eval()
    loaded.require_in_memory("--tasks (lm-evaluation-harness runs the whole model)")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit)
    except Exception as err:  # unknown task, task data unreachable (no hub): one line for the user
        raise UserError(f"lm-eval could not run tasks {', '.join(tasks)}: {first_line(err)}") from err
    return {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, metrics in output["results"].items()
    }
