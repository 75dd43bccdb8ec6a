"""Everything that can be checked before any weights load: the output folder, data files, the
model's config, the plan against the model, the export tools. Seconds, not minutes, to an error."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .archs import ArchSpec
from .atomic import check_target
from .calibration import check_text_source
from .errors import UserError
from .load import ModelSource, inspect_model, resolve_source
from .heal_plan import text_sources
from .plan import SELF_TEXT, Estimator, Granularity, HealObjective, HealPlan, Objective, Plan, Target
from .replay import check_replay


@dataclass(frozen=True)
class Inspected:
    """A model source whose config was read (no weights): loading reuses it."""

    source: ModelSource
    spec: ArchSpec
    config: dict
    n_blocks: int
    hf_config: object = None  # the transformers config itself, handed to the loader


def check_output(out: Path, force: bool) -> None:
    """`out` can be written: absent (or --force), its nearest existing parent a writable folder."""
    out = Path(out)
    check_target(out, force)
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create output {out}: {parent} is a file, not a folder")
    try:  # a real probe: permission bits say nothing for root or a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as err:
        raise UserError(f"cannot write output {out}: {parent} is not writable ({err.strerror})") from None


def inspect(model: str | None) -> Inspected:
    source = resolve_source(model)
    spec, config = inspect_model(source)
    as_dict = config.to_dict()
    return Inspected(source, spec, as_dict, int(as_dict[spec.layer_count_key]), config)


def require_export_tools(target: Target) -> None:
    """Missing runtimes are reported before minutes of pruning, not after."""
    if target is Target.gguf:
        from .runtimes import llamacpp

        llamacpp.llama_cpp_module()
        return
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        raise UserError("--target onnx needs onnxruntime and onnxruntime-genai (make install adds them)") from None


def check_distributed(plan: Plan) -> None:
    """What a run on several ranks (torchrun) cannot split, refused before anything loads."""
    ranks = distributed.world()
    if ranks == 1:
        return
    if plan.estimator is not Estimator.token:
        raise UserError(f"--estimator {plan.estimator.value} keeps a token sample that is not split over ranks; "
                        "use --estimator token, or run on one process")
    if plan.heal is not None:
        raise UserError("--heal trains the model in one process; run it without torchrun")
    if Objective.compensated in plan.objectives or plan.swaps:
        raise UserError("--objective compensated and --swaps need every window in one process; run them without torchrun")
    # A cross-fitted compensation gives each rank windows of both halves: two per rank.
    per_rank = 2 if plan.compensate else 1
    for flag, count in (("--n-samples", plan.calibration.n_samples), ("--compensation-samples", plan.compensation_samples)):
        if count is not None and count < per_rank * ranks:
            raise UserError(f"{flag} {count} gives some of the {ranks} ranks fewer than {per_rank} windows; "
                            f"use at least {per_rank * ranks}, or fewer ranks")
    if plan.evaluation is not None and plan.evaluation.windows < ranks:
        raise UserError(f"--eval-windows {plan.evaluation.windows} is fewer than one per rank for {ranks} ranks")


def check_plan(plan: Plan, out: Path | None = None, force: bool = False) -> Inspected:
    """All checks of a prune/build run, in the order of their cost; returns the inspected model."""
    check_distributed(plan)
    if out is not None:
        check_output(out, force)
    check_text_source(plan.calibration.source, "--calib")
    if plan.evaluation is not None:
        check_text_source(plan.evaluation.data, "--eval")
    if plan.heal is not None:
        check_heal_text(plan.heal.source)
        check_heal_objective(plan.heal)
    inspected = inspect(plan.model)
    plan.n_remove(inspected.n_blocks)
    if plan.replay is not None:
        check_replay(plan.replay, inspected.spec.model_type, inspected.n_blocks, inspected.config)
    if plan.granularity is Granularity.sublayer:
        check_sublayers(plan, inspected)
    if plan.export is not None:
        require_export_tools(plan.export.target)
        if plan.export.target is Target.onnx:
            from .runtimes.onnx_export import check_supported

            check_supported(inspected.spec)
    return inspected


def check_sublayers(plan: Plan, inspected: Inspected) -> None:
    """--granularity sublayer ships as llama.cpp's deci GGUF: the family, target and type must allow it."""
    spec = inspected.spec
    if spec.sublayer_gguf_arch is None:
        raise UserError(f"--granularity sublayer ships as llama.cpp's deci architecture, which runs Llama-family layers "
                        f"(llama, mistral); {spec.model_type} is not one (its rotary order or norms differ): use --granularity block")
    if distributed.active():
        raise UserError("--granularity sublayer runs in one process; run it without torchrun")
    n = inspected.n_blocks
    if plan.linear_attention >= n - plan.n_remove(n):
        raise UserError(f"--linear-attention {plan.linear_attention}: this model has {n} attention sublayers and the budget removes "
                        f"{plan.n_remove(n)} blocks' worth; replace fewer than {n - plan.n_remove(n)}")
    export = plan.export
    if export is None:
        return
    if export.target is Target.onnx:
        raise UserError("--granularity sublayer ships to llama.cpp (deci GGUF); onnxruntime-genai's builder has no "
                        "per-layer attention or feed-forward sizes: use --target gguf")
    if export.gguf_type is not None and inspected.source.kind == "gguf":
        raise UserError("--gguf-type re-encodes a GGUF source; with --granularity sublayer the deci GGUF keeps the source's "
                        "types: drop --gguf-type (or start from a Hugging Face folder)")


def check_heal_text(source: str) -> None:
    """Each `+`-joined part of --heal-text is a text source."""
    parts = text_sources(source)
    if not all(p.strip() for p in parts):
        raise UserError(f"--heal-text '{source}' has an empty part: join text sources with '+' (for example self+python-docs)")
    for part in parts:
        check_text_source(part, "--heal-text")


def check_heal_objective(heal: HealPlan) -> None:
    """The one combination of heal settings measured to do harm."""
    if heal.objective is HealObjective.blocks and SELF_TEXT in heal.sources():
        # Default model, N = 4: every block-local loss tried on self-generated text raised the
        # held-out perplexity (docs/method.md); on real text it lowered it.
        raise UserError("--heal-objective blocks on self-generated heal text made held-out perplexity worse in our measurements: "
                        "give real text (--heal-text FILE|wikitext2), or heal with --heal-objective logits")


def check_heal(pruned: Path, reference: str | None, out: Path, force: bool, eval_data: str | None, heal_text: str | None = None):
    """All checks of `heal`: the pruned folder and its pruning.json, the reference model against the
    recorded decision, the output, the --eval text. Returns (manifest, inspected reference)."""
    from pydantic import ValidationError

    from .manifest import MANIFEST_NAME, PruningManifest
    from .plan import validation_line
    from .replay import read_replay

    if distributed.active():
        raise UserError("heal trains one model in one process: run it without torchrun")
    check_output(out, force)
    pruned = Path(pruned)
    if not (pruned / MANIFEST_NAME).is_file() or not (pruned / "config.json").is_file():
        raise UserError(f"{pruned} is not a pruned checkpoint: give a folder written by `prune` (or the hf/ of build --keep-hf)")
    if Path(out).resolve() == pruned.resolve():
        raise UserError("--out is the pruned folder itself: write the healed checkpoint to another folder")
    _, replay = read_replay(pruned)
    try:
        manifest = PruningManifest.read(pruned)
    except ValidationError as err:
        raise UserError(f"{pruned}/{MANIFEST_NAME} is not a pruning.json of mi-prun-edge ({validation_line(err)})") from None
    if eval_data is not None:
        check_text_source(eval_data, "--eval")
    if heal_text is not None:
        check_heal_text(heal_text)
    if reference is None:
        if manifest.plan is None:
            raise UserError(f"{pruned}/{MANIFEST_NAME} records no plan to find the dense model in: give --reference")
        reference = manifest.plan.model
    try:
        inspected = inspect(reference)
    except UserError as err:
        raise UserError(f"{err} (the dense reference; give the model {pruned} was pruned from with --reference)") from None
    check_replay(replay, inspected.spec.model_type, inspected.n_blocks, inspected.config)
    return manifest, inspected
