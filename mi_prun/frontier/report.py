"""A measured frontier as a folder: frontier.json, the markdown table with its answer, the chart."""

from __future__ import annotations

from pathlib import Path

from ..machine import contention_line
from ..plan import Granularity, Target
from .points import FRONTIER_JSON, Frontier, FrontierPoint


def long_context(frontier: Frontier) -> int | None:
    """The context the long columns were measured at (None: a frontier without them)."""
    return frontier.plan.get("long_context") if frontier.long_speed and all(p.decode_tok_s_long for p in frontier.points) else None


def report(frontier: Frontier) -> str:
    points, primary = frontier.points, frontier.primary_text
    long = long_context(frontier)
    others = [t for t in points[0].ppl if t != primary]
    lines = [
        f"# Prune x quantize frontier: {Path(frontier.model).name}",
        "",
        f"Command: `{frontier.command}`" if frontier.command else "",
        "",
        (f"Every point measured in one run: quality in {frontier.runtime}, speed in {frontier.speed_runtime}. "
         if frontier.target == Target.onnx.value else "Every point measured in llama.cpp in one run. ")
        + "Quality: perplexity on "
        + "; ".join(f"{k} ({v})" for k, v in frontier.eval.items()) + f"; {frontier.kl}. "
        f"Speed: {frontier.speed}; median (min-max). Machine: {frontier.machine}.",
        "Whole run: " + contention_line(frontier.contention),
        "While timing: " + contention_line(frontier.timing_contention),
        *([f"At {long} tokens: {frontier.long_speed}." + _sublayer_legend(points)] if long else []),
        "",
        "| blocks removed | removed | type | size MiB | ppl " + Path(primary).name + " | " + " | ".join(f"ppl {Path(t).name}" for t in others)
        + (" | " if others else "") + "KL | top-1 | prefill ms | decode tok/s | speedup | "
        + (f"KV cache @{long} MiB | decode tok/s @{long} | " if long else "") + "front: size | front: speed |"
        + (f" front: speed @{long} |" if long else ""),
        "|---" * (12 + len(others) + (3 if long else 0)) + "|",
    ]
    lines += [_row(p, others, bool(long)) for p in points]
    lines += ["", *answer(frontier), ""]
    return "\n".join(lines) + "\n"


def _sublayer_legend(points: list[FrontierPoint]) -> str:
    """What the sublayer and linear-attention rows mean, said only where the table has such rows."""
    legend = ""
    if any(p.granularity is Granularity.sublayer for p in points):
        legend += (" A sublayer point (\"N sublayer\") removes at least N blocks' worth of bytes in attention and "
                   "feed-forward sublayers (`--granularity sublayer`, llama.cpp's deci GGUF); its `removed` lists the units.")
    if any(p.linear_attention for p in points):
        legend += (" \"+K linear\" turns K kept attention sublayers into fitted linear maps (`--linear-attention K`: "
                   "deci's linear attention, no KV cache), listed by block.")
    return legend


def _stats(s) -> str:
    return f"{s.median:.1f} ({s.min:.1f}-{s.max:.1f})"


def _row(p: FrontierPoint, others: list[str], long: bool) -> str:
    sublayer = p.granularity is Granularity.sublayer
    removed = ", ".join(p.removed_sublayers or []) if sublayer else str(p.removed)
    linear = f" +{len(p.linear_attention)} linear" if p.linear_attention else ""
    if p.linear_attention:
        removed += f"; linear: {', '.join(map(str, p.linear_attention))}"
    return (f"| {p.removed_blocks}{' healed' if p.healed else ''}{' sublayer' if sublayer else ''}{linear} | {removed} | {p.type} | "
            f"{p.bytes / 2**20:.1f} | {p.ppl_primary:.2f} | " + "".join(f"{p.ppl[t]:.2f} | " for t in others)
            + f"{p.kl_to_dense:.4f} | {p.top1_agreement:.1%} | {_stats(p.prefill_ms)} | {_stats(p.decode_tok_s)} | {p.speedup:.2f}x | "
            + (f"{p.kv_cache_bytes / 2**20:.1f} | {_stats(p.decode_tok_s_long)} | " if long else "")
            + f"{'yes' if p.on_size_front else ''} | {'yes' if p.on_speed_front else ''} |"
            + (f" {'yes' if p.on_long_speed_front else ''} |" if long else ""))


def answer(frontier: Frontier) -> list[str]:
    """The question the frontier is for, answered from its own points."""
    out = []
    long = long_context(frontier)
    fronts = [("on_size_front", "quality against size"), ("on_speed_front", "quality against decode speed")]
    if long:
        fronts.append(("on_long_speed_front", f"quality against decode speed at {long} tokens of context"))
    for front, what in fronts:
        pruned = [p.label for p in frontier.points if getattr(p, front) and p.removed_blocks > 0]
        dense = [p.label for p in frontier.points if getattr(p, front) and p.removed_blocks == 0]
        if pruned:
            out.append(f"- Front of {what}: pruned points on it: {', '.join(pruned)}; unpruned: {', '.join(dense) or 'none'}.")
        else:
            out.append(f"- Front of {what}: no pruned point is on it; every pruned point is beaten by an unpruned "
                       f"quantization ({', '.join(dense)}): a lower quantization pays more than removing blocks here.")
    out += granularities(frontier)
    if frontier.target == Target.onnx.value and frontier.source_type not in (None, "f32", "f16", "bf16"):
        out.append(f"- The model as given is {frontier.source_type}: its fp32 export holds those rounded weights (the reference "
                   "the KL is taken to), and int4 rounds them again.")
    elif frontier.source_type not in (None, "f32", "f16", "bf16"):
        out.append(f"- The model as given is {frontier.source_type}: every other type is made from its weights, so "
                   "f16 and q8_0 carry its quantization error (they cannot beat it by more than the rounding of the "
                   "activations), and a lower type rounds already rounded weights again.")
    return out


def granularities(frontier: Frontier) -> list[str]:
    """Each sublayer point against the block point of the same blocks' worth, both as built (in place)."""
    out = []
    as_built = [p for p in frontier.points if not p.healed and "(in place)" in p.type]
    blocks = {p.removed_blocks: p for p in as_built if p.granularity is Granularity.block}
    for sub in sorted((p for p in as_built if p.granularity is Granularity.sublayer),
                      key=lambda p: (p.removed_blocks, len(p.linear_attention or []))):
        n, block = sub.removed_blocks, blocks.get(sub.removed_blocks)
        if block is None:
            continue
        linear = f" with attention as linear maps in blocks {sub.linear_attention}" if sub.linear_attention else ""
        line = (f"- {n} blocks' worth, as built: sublayers ({', '.join(sub.removed_sublayers or [])}){linear} {sub.bytes / 2**20:.1f} MiB, "
                f"ppl {sub.ppl_primary:.2f}, decode {sub.decode_tok_s.median:.1f} tok/s; blocks {block.removed} "
                f"{block.bytes / 2**20:.1f} MiB, ppl {block.ppl_primary:.2f}, decode {block.decode_tok_s.median:.1f} tok/s")
        if sub.kv_cache_bytes is not None and block.kv_cache_bytes is not None and sub.decode_tok_s_long and block.decode_tok_s_long:
            line += (f"; at the long context, KV cache {sub.kv_cache_bytes / 2**20:.1f} against {block.kv_cache_bytes / 2**20:.1f} MiB, "
                     f"decode {sub.decode_tok_s_long.median:.1f} against {block.decode_tok_s_long.median:.1f} tok/s")
        out.append(line + ".")
    return out


def _kind(p: FrontierPoint) -> tuple[bool, bool, int]:
    """How a point was built, for the chart's groups: healed, sublayer, linear attentions."""
    return p.healed, p.granularity is Granularity.sublayer, len(p.linear_attention or [])


def chart(frontier: Frontier, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = frontier.points
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, x_of, xlabel, front in (
            (axes[0], lambda p: p.bytes / 2**20, "size (MiB)", "on_size_front"),
            (axes[1], lambda p: p.decode_tok_s.median, f"decode tokens/s ({frontier.speed_runtime})", "on_speed_front")):
        for n in sorted({p.removed_blocks for p in points}):
            here = [p for p in points if p.removed_blocks == n]
            for healed, sublayer, linear in sorted({_kind(p) for p in here}):
                group = [p for p in here if _kind(p) == (healed, sublayer, linear)]
                what = " (sublayers" + (f", {linear} linear attentions)" if linear else ")") if sublayer else ""
                ax.scatter([x_of(p) for p in group], [p.ppl_primary for p in group],
                           marker="D" if linear else "s" if sublayer else "^" if healed else "o",
                           label=f"{n} removed{' healed' if healed else ''}{what}")
        best = sorted((p for p in points if getattr(p, front)), key=x_of)
        ax.plot([x_of(p) for p in best], [p.ppl_primary for p in best], "k--", lw=1, label="front")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"perplexity, {Path(frontier.primary_text).name}")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"prune x quantize: {Path(frontier.model).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(frontier: Frontier, folder: Path) -> None:
    """frontier.json (the keys budgets read), frontier.md and frontier.png into `folder`."""
    (folder / FRONTIER_JSON).write_text(frontier.model_dump_json(indent=2) + "\n")
    (folder / "frontier.md").write_text(report(frontier))
    chart(frontier, folder / "frontier.png")
