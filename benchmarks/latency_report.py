"""reports/bench.{md,json} and its charts, from the payload benchmarks/latency.py measured (a support
module of that benchmark: it measures nothing)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from mi_prun.machine import contention_line

def fixed_cost_fit(rows: dict, flops: dict) -> tuple[float, float]:
    """Decode time per token = fixed + per_block * blocks, least squares over the variants (ms)."""
    xs = [flops[v]["blocks"] for v in rows]
    ys = [1000.0 / rows[v]["decode_tok_s"]["median"] for v in rows]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def header_lines(payload: dict) -> list[str]:
    """The title and how the run was made: command, machine and its load, model, removed blocks, method."""
    s = payload["settings"]
    return [
        "# Latency and memory: dense vs pruned, per runtime",
        "",
        f"Command: `{payload['command']}`"
        + (f"; peak memory re-measured with `{payload['memory_command']}`" if payload.get("memory_command") else "") + "  ",
        f"Machine: {payload['machine']}. Wall time {payload['wall_s']} s.  ",
        (contention_line(payload["contention"]) if payload.get("contention") else
         "Machine load: not recorded by this run (made before the benchmark recorded it): its absolute times may be contended.") + "  ",
        f"Model: {payload['model']}; removed blocks (MI-PRUN): "
        + ", ".join(f"{k}: {v}" for k, v in payload["removed"].items())
        + (f", built by `{payload['pruned_with']}` (compensated, as shipped)" if payload.get("pruned_with") else "") + ".  ",
        f"Each runtime: one process, warm-up, then {s['repeats']} alternating rounds; median [min-max]. "
        f"Decode: greedy, {s['decode_tokens']} tokens after a 128-token prompt. Peak RSS: a fresh process per model "
        "(load, prefill 512, decode 16); 'base' is the process before importing the runtime and loading the model.",
        "",
    ]


def speedup_lines(payload: dict) -> list[str]:
    """The speedup table: each pruned variant against dense, beside its FLOP ideal."""
    lines = [
        "## Speedup, pruned vs dense (ratio of medians within one run) and the FLOP-predicted ideal",
        "",
        "| runtime | model | prefill 128 | prefill 512 (ideal) | TTFT | decode tok/s (ideal) |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in payload["results"].items():
        for v, r in rows.items():
            if v == "dense":
                continue
            sp, ideal = r["speedup"], r["ideal"]
            lines.append(f"| {label} | {v} | {sp['prefill_128']:.3f}x | {sp['prefill_512']:.3f}x ({ideal['prefill_512']:.3f}x) | "
                         f"{sp['ttft']:.3f}x | {sp['decode']:.3f}x ({ideal['decode']:.3f}x) |")
    return lines


def ms(d: dict) -> str:
    """A summarized time in milliseconds: median [min-max]."""
    return f"{d['median'] * 1000:.1f} [{d['min'] * 1000:.1f}-{d['max'] * 1000:.1f}]"


def measurement_lines(payload: dict) -> list[str]:
    """The measurements table: size, prefill, TTFT, decode and peak memory of every variant."""
    lines = [
        "",
        "## Measurements",
        "",
        "| runtime | model | size MiB | prefill 128 ms | prefill 512 ms | TTFT ms | decode tok/s | peak RSS MiB (base) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in payload["results"].items():
        for v, r in rows.items():
            tps = r["decode_tok_s"]
            lines.append(f"| {label} | {v} | {r['bytes'] / 2**20:.1f} | {ms(r['prefill_128_s'])} | {ms(r['prefill_512_s'])} | "
                         f"{ms(r['ttft_s'])} | {tps['median']:.1f} [{tps['min']:.1f}-{tps['max']:.1f}] | "
                         f"{r['memory']['peak_rss_mib']:.0f} ({r['memory']['base_rss_mib']:.0f}) |")
    return lines


def gap_line(label: str, rows: dict, flops: dict) -> str:
    """One runtime's decode time split into a fixed part and a per-block part, against the head's FLOP share."""
    fixed, per_block = fixed_cost_fit(rows, flops)
    dense_ms = 1000.0 / rows["dense"]["decode_tok_s"]["median"]
    blocks = flops["dense"]["blocks"]
    head_share = flops["dense"]["head_params"] / (flops["dense"]["block_params"] + flops["dense"]["head_params"])
    fixed_share = fixed / dense_ms
    if fixed_share > head_share:
        why = ("more of the token time than the head's FLOP share does not shrink with the block count (sampling, "
               "the runtime's per-call work), so removing blocks gains less than the FLOP ideal")
    else:
        why = ("each block costs more than its FLOP share (per-operator dispatch and thread synchronisation repeat "
               "in every block, while the head is one large matmul), so removing blocks gains more than the FLOP ideal")
    return (
        f"- {label}: decode time per token fits {fixed:.2f} ms fixed + {per_block:.3f} ms per block "
        f"(dense: {dense_ms:.2f} ms for {blocks} blocks); the fixed part is {fixed_share:.0%} of the dense token "
        f"time, against {head_share:.0%} of the matmul FLOPs in the output head: {why}."
    )


def write_report(payload: dict, out: Path) -> None:
    """reports/bench.{json,md} and its two charts."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = header_lines(payload)
    if payload["skipped"]:
        lines += [f"Skipped (not installed): {', '.join(payload['skipped'])}.", ""]
    lines += speedup_lines(payload)
    lines += measurement_lines(payload)
    lines += ["", "## Where the gap to the ideal goes", ""]
    lines += [gap_line(label, rows, payload["flops"]) for label, rows in payload["results"].items()]
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    charts(payload, out)


def charts(payload: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(payload["results"])
    variants = [v for v in next(iter(payload["results"].values())) if v != "dense"] if labels else []
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, 2 * len(variants))
    x = np.arange(len(labels))
    for i, v in enumerate(variants):
        for j, metric in enumerate(("prefill_512", "decode")):
            vals = [payload["results"][l][v]["speedup"][metric] for l in labels]
            ax.bar(x + (2 * i + j) * width, vals, width, label=f"{v} {metric}")
            ideal = [payload["results"][l][v]["ideal"][metric] for l in labels]
            ax.scatter(x + (2 * i + j) * width, ideal, marker="_", color="black", s=200, zorder=3)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(x + width * (2 * len(variants) - 1) / 2, labels, rotation=20, fontsize=8)
    ax.set_ylabel("speedup vs dense (black: FLOP ideal)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_speedup.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    all_variants = list(next(iter(payload["results"].values()))) if labels else []
    width = 0.8 / max(1, len(all_variants))
    for i, v in enumerate(all_variants):
        ax.bar(x + i * width, [payload["results"][l][v]["memory"]["peak_rss_mib"] for l in labels], width, label=v)
    ax.set_xticks(x + width * (len(all_variants) - 1) / 2, labels, rotation=20, fontsize=8)
    ax.set_ylabel("peak RSS (MiB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_memory.png", dpi=120)
    plt.close(fig)
