"""Peak memory and wall time of `mi-prun-edge build --target gguf` against model size, in memory
and streamed: the product's own command, run as a subprocess per point, on seeded random-weight
Llama-shaped models (benchmarks/synthetic.py) and on the default model.

Each point is one `build` with file calibration (wiki.valid, few short windows, so that the
7B-shaped model runs in minutes) and `--remove 4`; the peak resident memory is the child's own
(wait4's ru_maxrss). The memory bound the streamed path promises is computed per point: the
largest block in fp32 + embedding and head in fp32 + the boundary states kept in RAM.

    make bench-scale   # -> reports/scale.{md,json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import synthetic
from mi_prun.machine import machine_line
from scale_sections import CALIBRATION_SECTION, attach

ROOT = Path(__file__).resolve().parents[1]
WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"
CLI = [sys.executable, "-m", "mi_prun"]
WINDOWS, SEQ_LEN, REMOVE = 4, 64, 4
# Rows measured before rows recorded their commit (at 8e06e85..f500977: the same engine, before the
# memory fixes of the streamed path: shared memo budget, chunked dequantization, malloc_trim,
# llama.cpp's check in a child process).
EARLIER = "8e06e85..f500977"

# (model, execution) points: the sizes up to 3B are run both ways (the 3B shape's 12.8 GiB of fp32
# weights are the most a 24 GiB machine loads whole); the 7B shape (27 GiB of fp32 weights, which
# do not fit) runs streamed only.
POINTS = [
    ("default", "in-memory"), ("default", "streamed"),
    ("0.3b.gguf", "in-memory"), ("0.3b.gguf", "streamed"),
    ("0.3b.safetensors", "in-memory"), ("0.3b.safetensors", "streamed"),
    ("1b.gguf", "in-memory"), ("1b.gguf", "streamed"),
    ("3b.gguf", "in-memory"), ("3b.gguf", "streamed"),
    ("7b.gguf", "streamed"),
    # Healing a streamed model, block by block (--heal-objective auto picks blocks when streamed).
    ("3b.gguf", "streamed-heal"),
]
HEAL_STEPS = 20
# The flags of each execution column.
FLAGS = {
    "in-memory": ["--in-memory"],
    "streamed": ["--streamed"],
    "streamed-heal": ["--streamed", "--heal", "--heal-text", str(WIKI_VALID), "--heal-samples", str(WINDOWS),
                      "--heal-steps", str(HEAL_STEPS)],
}


def model_path(name: str, work: Path) -> Path | None:
    """The model file or folder of a point, written by synthetic.py if missing (None: the default model)."""
    if name == "default":
        return None
    shape, fmt = name.rsplit(".", 1)
    path = work / (f"llama-{shape}.Q4_0.gguf" if fmt == "gguf" else f"llama-{shape}-bf16")
    if not path.exists():
        print(f"writing {path}", flush=True)
        synthetic.main(["--shape", shape, "--format", fmt, "--out", str(path)])
    return path


def memory_bound_bytes(shape: synthetic.Shape, windows: int = WINDOWS, seq_len: int = SEQ_LEN) -> int:
    """Largest block (fp32) + embedding and head (fp32) + boundary states kept in RAM (fp32)."""
    per_block = (shape.parameters() - 2 * shape.vocab * shape.hidden - shape.hidden) // shape.blocks
    states = (shape.blocks + 1) * windows * seq_len * shape.hidden
    return 4 * (per_block + 2 * shape.vocab * shape.hidden + states)


def load_now() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_point(name: str, execution: str, work: Path, windows: int = WINDOWS, seq_len: int = SEQ_LEN, runs: Path | None = None) -> dict:
    model = model_path(name, work)
    out = (runs or work / "runs") / f"{name}.{execution}"
    cmd = [*CLI, "build", "--target", "gguf", "--calib", str(WIKI_VALID), "--n-samples", str(windows),
           "--seq-len", str(seq_len), "--remove", str(REMOVE), *FLAGS[execution], "--out", str(out), "--force", "--quiet"]
    if model is not None:
        cmd[4:4] = ["--model", str(model)]
    before = load_now()
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    output = child.stdout.read()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # wait4's ru_maxrss covers the build and its waited-for children (llama.cpp's load check);
    # the build's own peak comes from its pruning.json.
    row = {"model": name, "execution": execution, "commit": commit, "wall_s": round(wall, 1),
           "peak_rss_with_children_gib": round(usage.ru_maxrss / 2**20, 2),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "load_before": before, "exit": os.waitstatus_to_exitcode(status)}
    if row["exit"] != 0:
        row["error"] = output.strip().splitlines()[-1:] or [""]
        row["peak_rss_gib"] = row["peak_rss_with_children_gib"]
        return row
    manifest = json.loads((out / "pruning.json").read_text())
    export = manifest["exports"][0]
    row.update(
        peak_rss_gib=round(manifest["peak_rss_mib"] / 1024, 2),
        removed=manifest["removed"], blocks=[manifest["blocks_before"], manifest["blocks_after"]],
        recorded_execution=manifest["execution"], timings_s=manifest["timings_s"],
        peak_rss_gib_after={k: round(v / 1024, 2) for k, v in manifest.get("peak_rss_mib_after", {}).items()},
        gguf_mib=round(export["bytes"] / 2**20, 1), llama_cpp_blocks=export["check"].get("llama_cpp_layers"),
        llama_cpp_check_peak_gib=round((export["check"].get("llama_cpp_peak_rss_mib") or 0) / 1024, 2),
        llama_cpp_check=export["check"],
        heal=manifest.get("heal"),
        profile_s=manifest.get("profile_s", {}), block_forwards=manifest.get("block_forwards", {}),
        block_forwards_minimum=manifest["selection"].get("block_forwards_minimum"),
    )
    return row


def parameter_counts() -> dict[str, int]:
    """Parameters of every model a point may name."""
    params = {f"{k}.gguf": s.parameters() for k, s in synthetic.SHAPES.items()} | {f"{k}.safetensors": s.parameters() for k, s in synthetic.SHAPES.items()}
    params["default"] = 134_515_008
    return params


def add_bounds(rows: list[dict], params: dict[str, int]) -> None:
    """Each row's parameter count, and for a streamed synthetic point its memory bound and whether it kept within 2x."""
    bounds = {f"{k}.{f}": memory_bound_bytes(s) for k, s in synthetic.SHAPES.items() for f in ("gguf", "safetensors")}
    for r in rows:
        r["parameters"] = params[r["model"]]
        if r["model"] in bounds and r["execution"].startswith("streamed"):
            r["bound_gib"] = round(bounds[r["model"]] / 2**30, 2)
            r["within_2x_bound"] = r.get("peak_rss_gib", 1e9) <= 2 * r["bound_gib"]


def header_lines(seconds: float) -> list[str]:
    """The title, how the points were measured, and the table's head."""
    return [
        "# Scale: peak memory and time of `build --target gguf`, in memory and streamed",
        "",
        "Command: `make bench-scale` (`python benchmarks/scale.py`); "
        f"{machine_line('torch on 2 threads')}; one run per point, points one after another, {seconds / 60:.0f} min of builds in all. "
        "Load average before each point is in the table (an otherwise idle machine reads below 1).",
        "",
        f"Each point: `mi-prun-edge build --target gguf --model M --calib wiki.valid.tokens --n-samples {WINDOWS} --seq-len {SEQ_LEN} "
        f"--remove {REMOVE} --streamed|--in-memory` (method mi-prun, proposals verified, compensation on; streamed-heal adds "
        f"`--heal --heal-text wiki.valid.tokens --heal-samples {WINDOWS} --heal-steps {HEAL_STEPS}`, healed block by block). "
        "Models: the default SmolLM2-135M Q4_1 and seeded random-weight Llama shapes (`benchmarks/synthetic.py`: Q4_0 GGUF, or bf16 "
        "safetensors shards); quality on random weights means nothing, memory and time do. Peak RSS is the build process's own "
        "(its ru_maxrss when it writes `pruning.json`, export included); the llama.cpp load check of the output runs in a child process, whose own peak is its own column; the column after it is the same process's peak so far "
        "at the end of loading, of selection and of export (from `pruning.json`), which shows which stage needed the memory. Bound: largest block + embedding + head + boundary states, all fp32.",
        "",
        "| model | parameters | execution | peak RSS (GiB) | peak so far after load / select / export (GiB) | 2 x bound (GiB) | wall (s) | stages (s) | removed | GGUF blocks (llama.cpp) | llama.cpp check's own peak (GiB) | load before | code |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def table_row(r: dict) -> str:
    """One point's row of the table (a failed point: its error in the stages column)."""
    if r.get("exit"):
        return f"| {r['model']} | {r['parameters'] / 1e9:.2f}B | {r['execution']} | {r['peak_rss_gib']} | | | {r['wall_s']} | failed: {r['error']} | | | | {r['load_before']} | {r.get('commit', EARLIER)} |"
    stages = ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items())
    bound = f"{2 * r['bound_gib']:.2f}" if "bound_gib" in r else ""
    after = r.get("peak_rss_gib_after", {})
    so_far = " / ".join(str(after.get(k, "-")) for k in ("load", "select", "export"))
    return (f"| {r['model']} | {r['parameters'] / 1e9:.2f}B | {r['execution']} | {r['peak_rss_gib']} | {so_far} | {bound} | {r['wall_s']} | "
            f"{stages} | {r['removed']} | {r['blocks'][0]} -> {r['blocks'][1]} ({r['llama_cpp_blocks']}) | {r.get('llama_cpp_check_peak_gib', '')} | {r['load_before']} | {r.get('commit', EARLIER)} |")


def commit_lines(rows: list[dict]) -> list[str]:
    """A note when the rows come from more than one state of the code."""
    commits = sorted({r.get("commit", EARLIER) for r in rows})
    if len(commits) <= 1:
        return []
    return ["", f"Rows come from {len(commits)} states of the code ({', '.join(commits)}: the code column); "
            "`python benchmarks/scale.py --fresh` measures every point at one."]


def both_ways_lines(rows: list[dict], params: dict[str, int]) -> list[str]:
    """Streamed against in memory for the largest model run both ways, and whether the two removed the same blocks."""
    both = [m for m in {r["model"] for r in rows} if {"in-memory", "streamed"} <= {r["execution"] for r in rows if r["model"] == m and not r.get("exit")}]
    if not both:
        return []
    largest = max(both, key=lambda m: params[m])
    rss = {r["execution"]: r["peak_rss_gib"] for r in rows if r["model"] == largest}
    lines = ["", f"Largest model run both ways: {largest}: streamed peak RSS {rss['streamed']} GiB = "
             f"{rss['streamed'] / rss['in-memory']:.2f} x in-memory ({rss['in-memory']} GiB)."]
    for m in sorted(both, key=lambda m: params[m]):
        same = {json.dumps(r["removed"]) for r in rows if r["model"] == m}
        lines.append(f"- {m}: the two executions removed {'the same blocks' if len(same) == 1 else 'DIFFERENT blocks: ' + ', '.join(same)}.")
    return lines


def bound_lines(rows: list[dict]) -> list[str]:
    """Each streamed point's peak against its bound, and the streamed healing point against the others of its model."""
    lines = []
    for r in rows:
        if "bound_gib" in r and not r.get("exit"):
            lines.append(f"- {r['model']} {r['execution']}: peak {r['peak_rss_gib']} GiB = {r['peak_rss_gib'] / r['bound_gib']:.2f} x the bound "
                         f"({r['bound_gib']} GiB); {'within' if r['within_2x_bound'] else 'NOT within'} 2x.")
    for r in rows:
        if r["execution"] == "streamed-heal" and not r.get("exit"):
            other = {o["execution"]: o["peak_rss_gib"] for o in rows if o["model"] == r["model"] and not o.get("exit")}
            heal = r.get("heal") or {}
            lines.append(f"- {r['model']} healed while streamed (blocks {heal.get('blocks')}, {heal.get('steps')} steps, "
                         f"heal stage {r['timings_s'].get('heal', 0):.0f} s): peak {r['peak_rss_gib']} GiB, against "
                         f"{other.get('streamed')} GiB streamed without healing and {other.get('in-memory')} GiB in memory.")
    return lines


def memory_lines(rows: list[dict]) -> list[str]:
    """Where the 7B shape's streamed memory goes, against the default model's process base."""
    base = next((r["peak_rss_gib_after"].get("load") for r in rows if r["model"] == "default" and r["execution"] == "streamed"
                 and r.get("peak_rss_gib_after")), None)
    big = next((r for r in rows if r["model"] == "7b.gguf" and not r.get("exit")), None)
    if base is None or big is None:
        return []
    after = big.get("peak_rss_gib_after", {})
    return [
        "",
        f"Where the memory goes (streamed): the process itself (Python, torch, transformers, the tokenizer, llama.cpp's "
        f"library) holds most of the {base} GiB the default model's streamed run has after loading (its embedding is 0.1 GiB); "
        "the bound does not count it, which is why small models sit far above 2x. On the 7B shape, loading ends at "
        f"{after.get('load')} GiB (that base + the head in fp32, 0.75 GiB: an untied embedding is read a row at a time when "
        "streamed); selection adds one block in fp32 "
        "(0.75 GiB), the ridge regression's float64 moments (d x d matrices of 134 MB at d = 4096, a few at a time) and "
        f"the memoized fits of the proposals (at most half a block's weights), reaching {after.get('select')} GiB: "
        f"{big['peak_rss_gib'] / big['bound_gib']:.2f} x the bound, {(big['peak_rss_gib'] - base) / big['bound_gib']:.2f} x "
        f"once the process base is set aside. The llama.cpp load check of the {big['gguf_mib'] / 1024:.1f} GiB output runs "
        f"in a child process and peaks at {big['llama_cpp_check_peak_gib']} GiB there (llama.cpp maps the file and repacks "
        "its Q4_0 weights for the CPU).",
    ]


def plot(rows: list[dict], png: Path) -> None:
    """Peak RSS and wall time against parameters, one line per execution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for execution, marker in (("in-memory", "o"), ("streamed", "s"), ("streamed-heal", "^")):
        pts = sorted((r["parameters"] / 1e9, r["peak_rss_gib"], r["wall_s"]) for r in rows if r["execution"] == execution and not r.get("exit"))
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=execution)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker=marker, label=execution)
    axes[0].axhline(24, color="grey", linestyle=":", label="machine memory (24 GiB)")
    for ax, label in zip(axes, ("peak RSS (GiB)", "wall time (s)")):
        ax.set_xlabel("parameters (billions)")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.legend()
    fig.suptitle("mi-prun-edge build --target gguf: in memory vs streamed")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def write_report(rows: list[dict], out: Path, seconds: float) -> None:
    """reports/scale.{md,json,png}; the torch.distributed section of scale_ranks.md stays attached to the page."""
    params = parameter_counts()
    add_bounds(rows, params)
    lines = [*header_lines(seconds), *map(table_row, rows), *commit_lines(rows), *both_ways_lines(rows, params), *bound_lines(rows),
             *memory_lines(rows)]
    lines += [
        "",
        "The 0.3b.safetensors streamed row was measured with 2 GiB checkpoint shards held in memory until written (its "
        "export stage takes it from 1.1 to 1.77 GiB); shards are 512 MiB since 01f6caa, not re-measured here.",
    ]
    lines += ["", "![peak RSS and wall time against parameters](scale.png)", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    attach(out.with_name("scale_ranks.md"), out.with_suffix(".md"))  # the torch.distributed section
    attach(out.with_name("scale_calibration.md"), out.with_suffix(".md"), CALIBRATION_SECTION, "python benchmarks/scale_calibration.py")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "windows": WINDOWS, "seq_len": SEQ_LEN, "remove": REMOVE}, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "scale")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "scale")
    parser.add_argument("--only", nargs="*", help="run only these models (names as in POINTS)")
    parser.add_argument("--fresh", action="store_true",
                        help="rerun points already measured (kept in WORK/rows.json): those of --only, or all")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    done_file = args.work / "rows.json"
    done = json.loads(done_file.read_text()) if done_file.is_file() else {}
    if args.fresh:
        done = {k: v for k, v in done.items() if args.only and k.split("/")[0] not in args.only}
    started = time.perf_counter()
    for name, execution in POINTS:
        key = f"{name}/{execution}"
        if (args.only and name not in args.only) or (key in done and not done[key].get("exit")):
            continue
        done[key] = run_point(name, execution, args.work)
        done_file.write_text(json.dumps(done, indent=1))
        print(json.dumps({k: v for k, v in done[key].items() if k != "llama_cpp_check"}), flush=True)
    rows = [done[f"{n}/{e}"] for n, e in POINTS if f"{n}/{e}" in done]
    for r in rows:  # rows measured before the row kept the build's own peak apart from its children's
        if "peak_rss_with_children_gib" not in r:
            r["peak_rss_with_children_gib"] = r["peak_rss_gib"]
            manifest = args.work / "runs" / f"{r['model']}.{r['execution']}" / "pruning.json"
            if not r.get("exit") and manifest.is_file():
                r["peak_rss_gib"] = round(json.loads(manifest.read_text())["peak_rss_mib"] / 1024, 2)
    for r in rows:  # rows measured before the manifest recorded the peak per stage
        manifest = args.work / "runs" / f"{r['model']}.{r['execution']}" / "pruning.json"
        if not r.get("exit") and "peak_rss_gib_after" not in r and manifest.is_file():
            after = json.loads(manifest.read_text()).get("peak_rss_mib_after", {})
            r["peak_rss_gib_after"] = {k: round(v / 1024, 2) for k, v in after.items()}
    write_report(rows, args.out, sum(r["wall_s"] for r in rows))


if __name__ == "__main__":
    main()
