"""The `mi-prun-edge` command line: parse, call the core, print. No logic of its own."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .calibration import CalibrationSpec
from .errors import UserError
from .progress import Reporter
from .scoring import Estimator, StateView

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prune transformer blocks with MI-PRUN and ship to edge runtimes.")
console = Console()
err_console = Console(stderr=True)

ModelOpt = typer.Option(None, "--model", "-m", help="Hugging Face folder, hub id, or .gguf file (default: the embedded SmolLM2-135M-Instruct).")
CalibOpt = typer.Option("self", "--calib", help="Calibration text: .txt/.jsonl/.parquet file, a dataset (wikitext2, PATH[@CONFIG][:SPLIT]), or 'self'.")
NSamplesOpt = typer.Option(16, "--n-samples", help="Calibration sequences.")
SeqLenOpt = typer.Option(256, "--seq-len", help="Tokens per calibration sequence.")
EstimatorOpt = typer.Option(Estimator.token, "--estimator", help="MI estimator.")
ViewOpt = typer.Option(StateView.raw, "--view", help="State view given to the estimators.")
SeedOpt = typer.Option(0, "--seed", help="Seed for calibration sampling, token subsampling and random selection.")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (float32 on CPU, bfloat16 on CUDA), float32, float16, bfloat16.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
CompensateOpt = typer.Option(
    True, "--compensate/--no-compensate",
    help="Fold a linear map fitted on the calibration text into the block before each removed run (plain weights, any runtime).",
)
CompensationSamplesOpt = typer.Option(
    None, "--compensation-samples",
    help="Calibration sequences for the final compensation fit (default: --n-samples); more fit better, each run costs a pass.",
)


def _user_errors(fn):
    """Bad input: one clear line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _options(method, estimator, view, remove, ratio, calib, n_samples, seq_len, seed, top_k, verify=True, compensate=True,
             compensation_samples=None):
    from .prune import Method, PruneOptions

    return PruneOptions(
        method=Method(method),
        estimator=estimator,
        view=view,
        remove=remove,
        ratio=ratio,
        calibration=CalibrationSpec(calib, n_samples, seq_len, seed),
        top_k=top_k,
        verify=verify,
        compensate=compensate,
        compensation_samples=compensation_samples,
        seed=seed,
    )


def _load(model, device, dtype, reporter, inspected=None):
    """Load `model`; `inspected` = (source, spec) when the config was already read for early checks."""
    from .load import inspect_model, load_inspected, resolve_source

    reporter.say(f"loading {model or 'the default model (SmolLM2-135M-Instruct Q4_1)'}")
    if reporter.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if inspected is None:
        source = resolve_source(model)
        inspected = (source, inspect_model(source)[0])
    return load_inspected(*inspected, device=device, dtype=dtype)


METHOD_HELP = "mi-prun, mi-prun-exact, shortgpt, angular, sleb, ppl, random."
RemoveOpt = typer.Option(None, "--remove", "-n", help="Number of blocks to remove.")
MethodOpt = typer.Option("mi-prun", "--method", help=METHOD_HELP)


@app.command()
@_user_errors
def prune(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the pruned Hugging Face checkpoint."),
    model: Optional[str] = ModelOpt,
    remove: Optional[int] = RemoveOpt,
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of blocks to remove (instead of --remove)."),
    method: str = MethodOpt,
    estimator: Estimator = EstimatorOpt,
    view: StateView = ViewOpt,
    calib: str = CalibOpt,
    n_samples: int = NSamplesOpt,
    seq_len: int = SeqLenOpt,
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Fast-Block-Select candidate runs (default 3N)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Score differing MI-PRUN proposals by calibration perplexity (one pass each)."),
    compensate: bool = CompensateOpt,
    compensation_samples: Optional[int] = CompensationSamplesOpt,
    seed: int = SeedOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    quiet: bool = QuietOpt,
):
    """Score blocks, choose the ones to remove, and write a pruned checkpoint + pruning.json."""
    from .atomic import check_target
    from .prune import Method, prune as run_prune, save_pruned

    if method not in {m.value for m in Method}:
        raise UserError(f"unknown --method '{method}'; choose one of {METHOD_HELP}")
    if remove is None and ratio is None:
        raise UserError("say how many blocks to remove: --remove N or --ratio R")
    from .load import inspect_model, resolve_source
    from .prune import blocks_to_remove, check_compensation_samples

    # Everything that can be checked without the weights is checked before minutes of work.
    check_target(out, force)
    options = _options(method, estimator, view, remove, ratio, calib, n_samples, seq_len, seed, top_k, verify, compensate,
                       compensation_samples)
    options.calibration.validate()
    check_compensation_samples(compensation_samples)
    source = resolve_source(model)
    spec, config = inspect_model(source)
    blocks_to_remove(getattr(config, spec.layer_count_key), remove, ratio)
    reporter = Reporter(quiet)
    loaded = _load(model, device, dtype, reporter, inspected=(source, spec))
    result = run_prune(loaded, options, reporter)
    manifest = save_pruned(loaded, options, result, out, force)
    _print_block_table(manifest.block_scores, manifest.removed)
    console.print(f"removed blocks {manifest.removed} ({manifest.blocks_before} -> {manifest.blocks_after})")
    _print_proposals(manifest)
    _print_compensation(manifest)
    console.print(f"timings (s): {json.dumps(manifest.timings_s)}")
    console.print(f"wrote {out}")


DEFAULT_BUILD_RATIO = 0.125


@app.command()
@_user_errors
def build(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: the artifact, pruning.json, README.md model card."),
    target: str = typer.Option("gguf", "--target", "-t", help="Runtime format: gguf (llama.cpp) or onnx (onnxruntime-genai)."),
    model: Optional[str] = ModelOpt,
    remove: Optional[int] = RemoveOpt,
    ratio: Optional[float] = typer.Option(None, "--ratio", help=f"Fraction of blocks to remove (default {DEFAULT_BUILD_RATIO} when neither is given)."),
    method: str = MethodOpt,
    estimator: Estimator = EstimatorOpt,
    view: StateView = ViewOpt,
    calib: str = CalibOpt,
    n_samples: int = NSamplesOpt,
    seq_len: int = SeqLenOpt,
    gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="f32, f16, q8_0, q4_0 (default: a .gguf input keeps its own quantization, others get q8_0)."),
    onnx_precision: str = typer.Option("int4", "--onnx-precision", help="fp32 or int4 (weight-only) for --target onnx."),
    keep_hf: bool = typer.Option(False, "--keep-hf", help="Also keep the repacked Hugging Face checkpoint (in hf/)."),
    eval_data: Optional[str] = typer.Option(None, "--eval", help="Held-out text to measure dense vs pruned quality for the model card (same formats as eval --data)."),
    eval_windows: int = typer.Option(16, "--eval-windows", help="Windows of 512 tokens evaluated with --eval."),
    compensate: bool = CompensateOpt,
    compensation_samples: Optional[int] = CompensationSamplesOpt,
    seed: int = SeedOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    quiet: bool = QuietOpt,
):
    """Prune, repack and export for an edge runtime in one step (a .gguf input is pruned in place)."""
    from .atomic import check_target
    from .build import BuildOptions, Target, build as run_build
    from .load import inspect_model, resolve_source
    from .prune import Method, blocks_to_remove, check_compensation_samples

    from exporters.onnx_export import OnnxPrecision

    target_kind = _choice(Target, target, "--target")
    gtype = _gguf_type(gguf_type)
    precision = _choice(OnnxPrecision, onnx_precision, "--onnx-precision")
    if method not in {m.value for m in Method}:
        raise UserError(f"unknown --method '{method}'; choose one of {METHOD_HELP}")
    if remove is None and ratio is None:
        ratio = DEFAULT_BUILD_RATIO
    check_target(out, force)
    options = BuildOptions(
        target=target_kind,
        prune=_options(method, estimator, view, remove, ratio, calib, n_samples, seq_len, seed, None, compensate=compensate,
                       compensation_samples=compensation_samples),
        gguf_type=gtype,
        onnx_precision=precision,
        keep_hf=keep_hf,
        eval_data=eval_data,
        eval_windows=eval_windows,
    )
    options.prune.calibration.validate()
    check_compensation_samples(compensation_samples)
    source = resolve_source(model)
    spec, config = inspect_model(source)
    blocks_to_remove(getattr(config, spec.layer_count_key), remove, ratio)
    _require_export_tools(target_kind)
    reporter = Reporter(quiet)
    loaded = _load(model, device, dtype, reporter, inspected=(source, spec))
    manifest = run_build(loaded, options, out, force, reporter)
    console.print(f"removed blocks {manifest.removed} ({manifest.blocks_before} -> {manifest.blocks_after})")
    _print_proposals(manifest)
    _print_compensation(manifest)
    for e in manifest.exports:
        console.print(f"{e.target} {e.format_type}: {out / e.file} ({e.bytes / 2**20:.1f} MiB; {e.route})")
    if manifest.quality:
        q = manifest.quality
        console.print(f"quality on {q.data}: ppl {q.dense_ppl:.2f} -> {q.pruned_ppl:.2f}, KL {q.kl_to_dense:.4f}, top-1 {q.top1_agreement:.1%}")
    console.print(f"timings (s): {json.dumps(manifest.timings_s)}")
    console.print(f"wrote {out} (model card: {out / 'README.md'})")


@app.command()
@_user_errors
def export(
    model: Path = typer.Option(..., "--model", "-m", help="Hugging Face folder (dense or pruned) to export as is."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    target: str = typer.Option("gguf", "--target", "-t", help="Runtime format: gguf (llama.cpp) or onnx (onnxruntime-genai)."),
    gguf_type: Optional[str] = typer.Option(None, "--gguf-type", help="f32, f16, q8_0 (default), q4_0."),
    onnx_precision: str = typer.Option("int4", "--onnx-precision", help="fp32 or int4 (weight-only) for --target onnx."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    quiet: bool = QuietOpt,
):
    """Export a Hugging Face folder without pruning (e.g. the dense model, to compare in the same runtime)."""
    from .atomic import check_target
    from .build import Target, export_folder
    from exporters.gguf_export import spec_of_folder

    from exporters.onnx_export import OnnxPrecision

    target_kind = _choice(Target, target, "--target")
    gtype = _gguf_type(gguf_type)
    precision = _choice(OnnxPrecision, onnx_precision, "--onnx-precision")
    check_target(out, force)
    spec_of_folder(model)
    _require_export_tools(target_kind)
    e = export_folder(model, target_kind, out, gtype, force, Reporter(quiet), onnx_precision=precision)
    console.print(f"{e.target} {e.format_type}: {out / e.file} ({e.bytes / 2**20:.1f} MiB; {e.route})")


def _choice(enum, value: str, flag: str):
    try:
        return enum(value)
    except ValueError:
        raise UserError(f"unknown {flag} '{value}'; choose one of {', '.join(m.value for m in enum)}") from None


def _gguf_type(value: Optional[str]):
    from exporters.gguf_export import GGUFType

    return None if value is None else _choice(GGUFType, value, "--gguf-type")


def _require_export_tools(target) -> None:
    """Missing runtimes are reported before minutes of pruning, not after."""
    if target.value == "gguf":
        from exporters import llamacpp

        llamacpp.llama_cpp_module()
        return
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise UserError("--target onnx needs onnxruntime and onnxruntime-genai (make install adds them)") from None


@app.command()
@_user_errors
def score(
    model: Optional[str] = ModelOpt,
    remove: int = typer.Option(4, "--remove", "-n", help="Blocks to remove when marking the chosen runs."),
    estimator: Estimator = EstimatorOpt,
    view: StateView = ViewOpt,
    calib: str = CalibOpt,
    n_samples: int = NSamplesOpt,
    seq_len: int = SeqLenOpt,
    seed: int = SeedOpt,
    heatmap: Path = typer.Option(Path("run_mi.png"), "--heatmap", help="PNG heatmap of run MI (start x end)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write block and run scores as JSON."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quiet: bool = QuietOpt,
):
    """Print the per-block MI table and draw the run-MI heatmap with the MI-PRUN choice marked."""
    from .calibration import calibration_batches
    from .plots import run_heatmap
    from .prune import Method, blocks_to_remove, run_scores, score_model, select_blocks

    reporter = Reporter(quiet)
    options = _options("mi-prun", estimator, view, remove, None, calib, n_samples, seq_len, seed, None)
    loaded = _load(model, device, dtype, reporter)
    calib_ids = calibration_batches(loaded.model, loaded.tokenizer, options.calibration)
    scores = score_model(loaded, calib_ids, options, reporter)
    n_remove = blocks_to_remove(scores.n_blocks, remove, None)
    removed, _ = select_blocks(loaded, scores, calib_ids, options, n_remove)
    table = scores.block_table()
    _print_block_table(table, removed)
    run_heatmap(scores.run_matrix(), removed, heatmap, title=f"{loaded.source.describe()} ({estimator.value} MI, nats)")
    console.print(f"MI-PRUN would remove {removed}; heatmap: {heatmap}")
    if json_out is not None:
        payload = {"block_scores": table, "removed": removed, "runs": [r.model_dump() for r in run_scores(scores)]}
        json_out.write_text(json.dumps(payload, indent=2) + "\n")


@app.command("eval")
@_user_errors
def eval_(
    data: str = typer.Option(..., "--data", help="Evaluation text: .txt/.jsonl/.parquet file, or a dataset (wikitext2 = its test split, PATH[@CONFIG][:SPLIT])."),
    model: Optional[str] = ModelOpt,
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Reference (dense) model for KL and top-1 agreement; any --model source."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per window."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Strided windows: shift by this many tokens, score only the new ones (default: non-overlapping)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Evaluate only the first N windows."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward pass."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated lm-eval tasks (e.g. arc_easy,hellaswag); needs the 'tasks' extra."),
    task_limit: Optional[int] = typer.Option(None, "--task-limit", help="Examples per lm-eval task."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON to this file ('-' for stdout)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quiet: bool = QuietOpt,
):
    """Perplexity on held-out text; with --reference, KL(reference || model) and top-1 agreement."""
    from .load import inspect_model, resolve_source
    from .quality import calibration_overlap, run_eval

    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if task_list:
        from .tasks import require_lm_eval

        require_lm_eval()
    # Configs are read once, up front (seconds for a GGUF), and reused for loading.
    source = resolve_source(model)
    inspected = (source, inspect_model(source)[0])
    ref_inspected = None
    if reference is not None:
        ref_source = resolve_source(reference)
        ref_inspected = (ref_source, inspect_model(ref_source)[0])
    warning = calibration_overlap(source, data)
    if warning:
        err_console.print(f"[bold yellow]WARNING:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    reporter = Reporter(quiet)
    loaded = _load(model, device, dtype, reporter, inspected=inspected)
    ref = _load(reference, device, dtype, reporter, inspected=ref_inspected) if reference is not None else None
    result = run_eval(loaded, data, seq_len, stride, max_windows, batch_size, ref, reporter)
    payload = {"model": loaded.source.describe(), "reference": ref.source.describe() if ref else None, "data": data,
               **result.to_dict(), "warnings": [warning] if warning else []}
    if task_list:
        from .tasks import run_tasks

        payload["tasks"] = run_tasks(loaded, task_list, task_limit, batch_size)
    table = Table(title=f"{payload['model']} on {data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("perplexity", f"{result.ppl:.3f}"), ("mean NLL (nats)", f"{result.nll:.4f}")]
    if result.kl is not None:
        rows += [("KL(reference || model) per token (nats)", f"{result.kl:.4f}"), ("top-1 agreement", f"{result.top1:.2%}")]
    rows += [("tokens scored", str(result.tokens)), ("windows", f"{result.windows} x {result.seq_len} (stride {result.stride})"),
             ("wall time (s)", f"{result.wall_s:.1f}")]
    for task, metrics in payload.get("tasks", {}).items():
        rows += [(f"{task} {name}", f"{value:.4f}") for name, value in metrics.items()]
    for row in rows:
        table.add_row(*row)
    if json_out is not None and str(json_out) == "-":
        print(json.dumps(payload, indent=2))
        return
    console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {json_out}")


def _print_proposals(manifest) -> None:
    """MI-PRUN's proposals and what decided between them (nothing when no verification ran)."""
    sel = manifest.selection
    if sel.verification is None:
        return
    console.print(f"MI-PRUN proposals, scored by {sel.verification}:", highlight=False, soft_wrap=True)
    for c in sel.candidates:
        kept = "  <- kept" if c.removed == manifest.removed else ""
        console.print(f"  {c.objective}: {c.removed} NLL {c.calibration_nll:.4f}{kept}", highlight=False, soft_wrap=True)


def _print_compensation(manifest) -> None:
    c = manifest.compensation
    if c is None or not c.enabled:
        console.print(f"compensation: off{f' ({c.note})' if c is not None and c.note else ''}")
        return
    parts = [
        f"blocks {r.first}-{r.last} -> block {r.folded_into} (held-out error x{r.heldout_error_ratio:.2f} of plain removal)"
        if r.folded_into is not None else f"blocks {r.first}-{r.last}: none (nothing before block 0)"
        for r in c.runs
    ]
    console.print("compensation: " + "; ".join(parts), highlight=False)


def _print_block_table(table: dict[str, list[float]], removed: list[int]) -> None:
    out = Table(title="per-block scores (boundary i -> i+1)")
    out.add_column("block", justify="right")
    for key in table:
        out.add_column(key, justify="right")
    out.add_column("removed")
    for i in range(len(next(iter(table.values())))):
        out.add_row(str(i), *(f"{table[k][i]:.4f}" for k in table), "x" if i in removed else "")
    console.print(out)


if __name__ == "__main__":
    app()
