"""What the commands print: tables and one-line summaries of a manifest."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from ..manifest import unit_name

console = Console()


def line(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True, markup=False)


def healed(manifest) -> None:
    h = manifest.heal
    trained = f"LoRA rank {h.rank}" + (f" and the norm weights of {'every kept block' if h.objective == 'logits' else 'each adapted block'}" if h.norms else "")
    text = (f"healed blocks {h.blocks} ({h.trained_parameters} parameters trained: {trained}): {h.steps} steps, "
              f"{h.tokens} tokens, {h.seconds:.0f} s ({h.precision}, objective {h.objective}); {h.fit()}")
    if h.heldout_before is not None and h.heldout_after is not None:
        text += f"; held-out ppl {h.heldout_before:.2f} -> {h.heldout_after:.2f}"
    line(text)


def quality(q) -> None:
    line(f"quality on {q.data}: ppl {q.dense_ppl:.2f} -> {q.pruned_ppl:.2f}, KL {q.kl_to_dense:.4f}, top-1 {q.top1_agreement:.1%}")


def block_table(table: dict[str, list[float]], removed: list[int]) -> None:
    if not table:
        return
    out = Table(title="per-block scores (boundary i -> i+1)")
    out.add_column("block", justify="right")
    for key in table:
        out.add_column(key, justify="right")
    out.add_column("removed")
    for i in range(len(next(iter(table.values())))):
        out.add_row(str(i), *(f"{table[k][i]:.4f}" for k in table), "x" if i in removed else "")
    console.print(out)


def proposals(manifest) -> None:
    """MI-PRUN's proposals and what decided between them (nothing when no verification ran)."""
    sel = manifest.selection
    if sel.replayed_from is not None:
        line(f"decision replayed from {sel.replayed_from}")
    if sel.verification is None:
        return
    line(f"MI-PRUN proposals, scored by {sel.verification}:")
    for c in sel.candidates:
        kept = "  <- kept" if c.removed == manifest.removed else ""
        lower = f" (lower: p = {c.lower_p:.3f})" if c.lower_p is not None else ""
        # Proposals that all agree are not scored: there is nothing to decide.
        nll = f"NLL {c.calibration_nll:.4f}" if c.calibration_nll is not None else "(not scored: the proposals agree)"
        line(f"  {c.objective}: {c.removed} {nll}{lower}{kept}")


def compensation(manifest) -> None:
    c = manifest.compensation
    if c is None or not c.enabled:
        line(f"compensation: off{f' ({c.note})' if c is not None and c.note else ''}")
        return
    if manifest.sublayers is not None:  # runs numbered by unit (2b: block b's attention, 2b+1: its feed-forward network)
        parts = [f"{unit_name(r.first)}..{unit_name(r.last)}: none (nothing before it)" if r.folded_into is None and r.slot is None else
                 f"{unit_name(r.first)}..{unit_name(r.last)} -> "
                 + (f"a linear map in {unit_name(2 * r.slot)}'s slot" if r.slot is not None else unit_name(r.folded_into))
                 + f" (held-out error x{r.heldout_error_ratio:.2f} of plain removal)" for r in c.runs]
    else:
        parts = [
            f"blocks {r.first}-{r.last} -> block {r.folded_into} (held-out error x{r.heldout_error_ratio:.2f} of plain removal)"
            if r.folded_into is not None else f"blocks {r.first}-{r.last}: none (nothing before block 0)"
            for r in c.runs
        ]
    line("compensation: " + "; ".join(parts))


def decision(manifest) -> None:
    sub = manifest.sublayers
    if sub is not None:
        line(f"removed sublayers {', '.join(sub.removed)} ({sub.bytes_removed / 2**20:.1f} MiB; budget {sub.budget_bytes / 2**20:.1f} MiB)")
        if sub.linear_attention:
            nll = f", calibration NLL {sub.calibration_nll:.4f} as shipped" if sub.calibration_nll is not None else ""
            line(f"attention as linear maps (no KV cache): blocks {[m.block for m in sub.linear_attention]} (held-out error "
                 + ", ".join(f"x{m.heldout_error_ratio:.2f}" for m in sub.linear_attention) + f" of dropping it{nll})")
    line(f"removed blocks {manifest.removed} ({manifest.blocks_before} -> {manifest.blocks_after})")
    proposals(manifest)
    compensation(manifest)


def timings(manifest) -> None:
    line(f"timings (s): {json.dumps(manifest.timings_s)}")
    least = manifest.selection.block_forwards_minimum
    if least:
        done = sum(manifest.block_forwards.get(stage, 0) for stage in ("capture", "select"))
        line(f"block-forwards (capture + select): {done} ({done / least:.2f}x the least these proposals need, {least}); "
             "the seconds of each stage by kind of work are in pruning.json's profile_s")


def metric_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def export_line(e, out) -> None:
    line(f"{e.target} {e.format_type}: {out / e.file} ({e.bytes / 2**20:.1f} MiB; {e.route})")


def built(result) -> None:
    """What `build` prints: the decision, the files, healing and quality, the timings."""
    manifest, out = result.manifest, result.out
    decision(manifest)
    for e in manifest.exports:
        export_line(e, out)
    if manifest.heal:
        healed(manifest)
    if manifest.quality:
        quality(manifest.quality)
    timings(manifest)
    line(f"wrote {out} (model card: {out / 'README.md'})")


def pruned(result) -> None:
    manifest = result.manifest
    block_table(manifest.block_scores, manifest.removed)
    decision(manifest)
    timings(manifest)
    line(f"wrote {result.out}")


def healed_checkpoint(result) -> None:
    healed(result.manifest)
    if result.manifest.quality:
        quality(result.manifest.quality)
    line(f"wrote {result.out} (export it with `mi-prun-edge export --model {result.out}`)")


def frontier_points(frontier, out) -> None:
    for p in frontier.points:
        marks = [m for m, on in (("size", p.on_size_front), ("speed", p.on_speed_front), ("long-context speed", p.on_long_speed_front)) if on]
        long = f", {p.decode_tok_s_long.median:.1f} tok/s at long context, KV cache {p.kv_cache_bytes / 2**20:.1f} MiB" \
            if p.decode_tok_s_long is not None and p.kv_cache_bytes is not None else ""
        line(f"{p.label}: {p.bytes / 2**20:.1f} MiB, ppl {p.ppl_primary:.2f}, {p.decode_tok_s.median:.1f} tok/s{long}"
             + (f"  [front: {', '.join(marks)}]" if marks else ""))
    line(f"wrote {out / 'frontier.md'}")
