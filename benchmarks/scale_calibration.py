"""`build` at the build's default calibration size (16 windows x 256 tokens) on the 1B- and
7B-shaped synthetic models: wall time per stage and where it went (pruning.json's profile_s),
block-forwards done against the least the proposals need, and the whole build against one
forward pass over the same tokens measured in the same run.

The forward pass is the capture stage's own pass over the calibration windows: its forward
compute, reads, dequantization and copies (profile_s), without the MI estimation that follows it
("other"). Every build is the product's command (scale.run_point), one after another.

    make bench-scale-calibration   # -> reports/scale_calibration.{md,json}, attached to reports/scale.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import scale
import synthetic
from mi_prun.machine import machine_line
from scale_sections import CALIBRATION_SECTION, attach

ROOT = Path(__file__).resolve().parents[1]
WINDOWS, SEQ_LEN = 16, 256  # the build's default calibration size (CalibrationSpec)
POINTS = [("1b.gguf", "in-memory"), ("1b.gguf", "streamed"), ("7b.gguf", "streamed")]
PASS_PARTS = ("forward", "read", "dequantize", "copy to device")
GOAL = 4.0  # the whole build within this many forward passes (issue: real model sizes at the speed of the hardware)


def forward_pass_s(row: dict) -> float:
    capture = row["profile_s"].get("capture", {})
    return sum(capture.get(part, 0.0) for part in PASS_PARTS)


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | execution | wall (s) | stages (s) | one forward pass (s) | wall / forward pass | block-forwards capture + select (least) | "
             "peak RSS (GiB) | 2 x bound (GiB) | removed | load before |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("exit"):
            lines.append(f"| {r['model']} | {r['execution']} | {r['wall_s']} | failed: {r['error']} | | | | | | | {r['load_before']} |")
            continue
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items())
        one = forward_pass_s(r)
        done = r["block_forwards"].get("capture", 0) + r["block_forwards"].get("select", 0)
        least = r.get("block_forwards_minimum")
        forwards = f"{done} ({least}): {done / least:.2f}x" if least else str(done)
        bound = f"{2 * r['bound_gib']:.2f}" if "bound_gib" in r else ""
        lines.append(f"| {r['model']} | {r['execution']} | {r['wall_s']} | {stages} | {one:.0f} | {r['wall_s'] / one:.1f}x | {forwards} | "
                     f"{r['peak_rss_gib']} | {bound} | {r['removed']} | {r['load_before']} |")
    return lines


def where_lines(rows: list[dict]) -> list[str]:
    """Each build's seconds by kind of work, summed over its stages (load included)."""
    lines = ["", "Where the seconds went (all stages, from profile_s; \"other\" is MI estimation, selection and bookkeeping):", ""]
    for r in rows:
        if r.get("exit"):
            continue
        total: dict[str, float] = {}
        for stage, parts in r["profile_s"].items():
            for part, seconds in parts.items():
                if part != "wall":
                    total[part] = total.get(part, 0.0) + seconds
        split = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(total.items(), key=lambda kv: -kv[1]))
        lines.append(f"- {r['model']} {r['execution']}: {split}.")
    return lines


def verdict_lines(rows: list[dict]) -> list[str]:
    lines = [""]
    for r in rows:
        if r.get("exit"):
            continue
        ratio = r["wall_s"] / forward_pass_s(r)
        lines.append(f"- {r['model']} {r['execution']}: the build took {ratio:.1f} forward passes; the goal is at most {GOAL:.0f}: "
                     + ("met." if ratio <= GOAL else "NOT met."))
        if "bound_gib" in r:
            lines.append(f"  Peak RSS {r['peak_rss_gib']} GiB = {r['peak_rss_gib'] / r['bound_gib']:.2f} x the streamed bound "
                         f"({r['bound_gib']} GiB); {'within' if r['peak_rss_gib'] <= 2 * r['bound_gib'] else 'NOT within'} 2x.")
    runs: dict[str, list] = {}
    for r in rows:
        if not r.get("exit"):
            runs.setdefault(r["model"], []).append(r["removed"])
    for model, removed in runs.items():
        if len(removed) > 1:
            same = len({json.dumps(x) for x in removed}) == 1
            lines.append(f"- {model}: {' and '.join(r['execution'] for r in rows if r['model'] == model and not r.get('exit'))} "
                         + ("removed the same blocks." if same else f"removed DIFFERENT blocks: {removed}."))
    return lines


def write_report(rows: list[dict], out: Path, seconds: float) -> None:
    bounds = {f"{k}.gguf": scale.memory_bound_bytes(s, WINDOWS, SEQ_LEN) for k, s in synthetic.SHAPES.items()}
    for r in rows:
        if r["execution"] == "streamed" and r["model"] in bounds:
            r["bound_gib"] = round(bounds[r["model"]] / 2**30, 2)
    lines = [
        f"# Scale at the default calibration size: `build --target gguf`, {WINDOWS} x {SEQ_LEN} tokens",
        "",
        f"Command: `make bench-scale-calibration` (`python benchmarks/scale_calibration.py`); {machine_line('torch on 2 threads')}; "
        f"one run per point, one after another, {seconds / 60:.0f} min in all (writing the synthetic models included). Load average "
        "before each point is in the table (an otherwise idle machine reads below 1).",
        "",
        f"Each point: `mi-prun-edge build --target gguf --model M --calib wiki.valid.tokens --n-samples {WINDOWS} --seq-len {SEQ_LEN} "
        f"--remove {scale.REMOVE} --streamed|--in-memory` (method mi-prun, proposals verified, compensation on). Models: seeded "
        "random-weight Llama shapes (`benchmarks/synthetic.py`, Q4_0 GGUF): time and memory mean something on them, quality does not. "
        "One forward pass: the capture stage's pass over the same windows (its forward, read, dequantize and copy parts in "
        "pruning.json's profile_s, not the MI estimation after it; in memory, the blocks were dequantized once at load, which "
        "the whole build's wall time counts and the pass does not). Wall time: the build process, start to exit. Block-forwards: one block over one window; the least is one "
        "capture pass plus, for each verified proposal, the blocks from the first it changes.",
        "",
        *table(rows), *where_lines(rows), *verdict_lines(rows), "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "windows": WINDOWS, "seq_len": SEQ_LEN, "remove": scale.REMOVE}, indent=2) + "\n")
    attach(out.with_suffix(".md"), section=CALIBRATION_SECTION, command="python benchmarks/scale_calibration.py")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "scale", help="models and builds (shared with scale.py)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "scale_calibration")
    parser.add_argument("--only", nargs="*", help="run only these models (names as in POINTS)")
    args = parser.parse_args(argv)
    work = args.work / "calibration"
    work.mkdir(parents=True, exist_ok=True)
    done_file = work / "rows.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    started = time.perf_counter()
    for name, execution in POINTS:
        key = f"{name}/{execution}"
        if args.only and name not in args.only:
            continue
        done[key] = scale.run_point(name, execution, args.work, WINDOWS, SEQ_LEN, runs=work / "runs")
        done_file.write_text(json.dumps(done, indent=1))
        print(json.dumps({k: v for k, v in done[key].items() if k != "llama_cpp_check"}), flush=True)
    rows = [done[f"{n}/{e}"] for n, e in POINTS if f"{n}/{e}" in done]
    write_report(rows, args.out, time.perf_counter() - started)


if __name__ == "__main__":
    main()
