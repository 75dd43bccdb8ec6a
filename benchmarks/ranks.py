"""Capture + selection on one process against two (torch.distributed, gloo), one thread each.

Each run is the product's own command: `mi-prun-edge prune --remove 4` on the default model, as
one process (`python -m mi_prun`) or as two ranks (`torchrun --nproc-per-node 2 -m mi_prun`),
every process with one thread (OMP_NUM_THREADS=1). Calibration: 16 x 256 tokens of wiki.valid
(a file, so no rank waits for rank 0 to generate text; the default `--calib self` is written by
rank 0 alone). The stage times are rank 0's, from pruning.json; the all-reduce volume is what
rank 0 sent into collectives, per forward pass counted by the selection. Runs alternate between
the settings, so a slower spell of the machine hits both.

    python benchmarks/ranks.py    # -> reports/scale_ranks.{md,json}; about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mi_prun.machine import machine_line
from scale_sections import SCALE_MD, attach

ROOT = Path(__file__).resolve().parents[1]
WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"
BIN = Path(sys.executable).parent
SETTINGS = {
    "1 process x 1 thread": [sys.executable, "-m", "mi_prun"],
    "2 processes x 1 thread": [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "mi_prun"],
}


def run(launcher: list[str], out: Path) -> dict:
    args = ["prune", "--remove", "4", "--calib", str(WIKI_VALID), "--n-samples", "16", "--seq-len", "256",
            "--out", str(out), "--force", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    subprocess.run([*launcher, *args], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    manifest = json.loads((out / "pruning.json").read_text())
    t = manifest["timings_s"]
    dist = manifest.get("distributed") or {}
    passes = manifest["selection"]["forward_passes"]
    return {
        "wall_s": round(time.time() - start, 1),
        "capture_select_s": round(t["capture"] + t["select"], 2),
        "timings_s": t,
        "removed": manifest["removed"],
        "forward_passes": passes,
        "reductions": dist.get("reductions", 0),
        "reduced_mib": dist.get("reduced_mib", 0.0),
        "reduced_mib_per_pass": round(dist.get("reduced_mib", 0.0) / passes, 3) if passes else None,
    }


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "scale_ranks")
    args = p.parse_args(argv)
    load_before = list(os.getloadavg())
    rows: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="ranks-") as work:
        for repeat in range(args.repeats):
            for name, launcher in SETTINGS.items():
                rows[name].append(run(launcher, Path(work) / f"{repeat}-{len(rows[name])}-{name[0]}"))
                print(name, json.dumps(rows[name][-1]), flush=True)
    one, two = ([r["capture_select_s"] for r in rows[name]] for name in SETTINGS)
    ratios = [b / a for a, b in zip(one, two)]
    payload = {
        "command": "python benchmarks/ranks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_line("one torch thread per process"),
        "loadavg_before_after": [load_before, list(os.getloadavg())],
        "rows": rows, "ratio_two_to_one": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(report(payload) + "\n")
    attach(args.out.with_suffix(".md"), SCALE_MD)  # its section of reports/scale.md
    print(report(payload))


def report(payload: dict) -> str:
    rows = payload["rows"]
    lines = [
        "# Capture + selection over ranks (torch.distributed, gloo)", "",
        f"Command: `{payload['command']}`. {payload['machine']}. Load average (1, 5, 15 min) before "
        f"{payload['loadavg_before_after'][0]}, after {payload['loadavg_before_after'][1]}.", "",
        "`mi-prun-edge prune --remove 4` on the default model (SmolLM2-135M, Q4_1 GGUF), calibration 16 x 256 tokens "
        "of wiki.valid, compensation on; each process one thread. Times are rank 0's stages from pruning.json, "
        "median (min-max) of the runs; the settings alternate.", "",
        "| setting | capture + select s | capture s | select s | wall s (with loading) | removed | collectives | sent MiB | MiB per forward pass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in rows.items():
        lines.append(
            f"| {name} | {summary([r['capture_select_s'] for r in runs])} | {summary([r['timings_s']['capture'] for r in runs])} | "
            f"{summary([r['timings_s']['select'] for r in runs])} | {summary([r['wall_s'] for r in runs])} | {runs[0]['removed']} | "
            f"{runs[0]['reductions']} | {runs[0]['reduced_mib']} | {runs[0]['reduced_mib_per_pass']} |")
    ratios = payload["ratio_two_to_one"]
    lines += ["", f"Two ranks over one, capture + select, run by run: median {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}); the goal is at most 0.60x."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
