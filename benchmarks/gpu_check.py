"""What `build` does on a CUDA GPU: wall time per stage, peak GPU memory, and whether it removes
the blocks the CPU run removes (bf16 on the GPU against fp32 on the CPU, so a near tie may differ).

Every build is the product's own command (`python -m mi_prun build --target gguf`), as a user runs it:
the default model with its default settings on `--device cuda` and on `--device cpu`; the 7B-shaped
synthetic Llama of benchmarks/synthetic.py (random weights: time and memory only) streamed on the
GPU with file calibration (4 x 64 tokens of wiki.valid, as `make bench-scale`), its CPU blocks taken
from reports/scale.json. Run through benchmarks/gpu_check.sh.
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

ROOT = Path(__file__).resolve().parents[1]
WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"
CLI = [sys.executable, "-m", "mi_prun", "build", "--target", "gguf", "--force", "--quiet"]


def build(out: Path, *flags: str, timeout_s: float) -> dict:
    """One `build` as a user runs it; a failure or a timeout is a row saying so (the lease is short:
    one failing stage must not cost the others' figures)."""
    start = time.time()
    try:
        run = subprocess.run([*CLI, "--out", str(out), *flags], cwd=ROOT, timeout=timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"flags": " ".join(flags), "wall_s": round(time.time() - start, 1), "error": f"not finished in {timeout_s:.0f} s"}
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr[-6000:], sep="\n", file=sys.stderr)
        last = (run.stderr.strip() or run.stdout.strip() or "no output").splitlines()[-1]
        return {"flags": " ".join(flags), "wall_s": round(time.time() - start, 1), "error": f"exit {run.returncode}: {last[:300]}"}
    m = json.loads((out / "pruning.json").read_text())
    return {"flags": " ".join(flags), "wall_s": round(time.time() - start, 1), "removed": m["removed"], "device": m["device"],
            "dtype": m["dtype"], "execution": m["execution"], "timings_s": m["timings_s"], "peak_gpu_mib": m.get("peak_gpu_mib"),
            "peak_rss_mib": m["peak_rss_mib"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--skip-7b", action="store_true")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "gpu-check")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu")
    p.add_argument("--calib", type=Path, default=WIKI_VALID, help="calibration text of the 7B build (wiki.valid.tokens)")
    p.add_argument("--timeout", type=float, default=300, help="seconds one build may take before it is reported unfinished")
    args = p.parse_args(argv)
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    payload = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cpus": os.cpu_count(), "rows": []}

    def add(row: dict) -> None:  # the report is rewritten after every build: a cut-short lease keeps what was measured
        payload["rows"].append(row)
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(report(payload) + "\n")

    # The GPU runs first: on a short lease they are the figures nobody has; the CPU run is the reference.
    add({"model": "default", "device": "cuda", **build(args.work / "default-cuda", "--device", "cuda", timeout_s=args.timeout)})
    if not args.skip_7b:
        model = args.work / "llama-7b.Q4_0.gguf"
        if not model.exists():
            synthetic.main(["--shape", "7b", "--format", "gguf", "--out", str(model)])
        add({"model": "7b (synthetic)", "device": "cuda",
             **build(args.work / "7b-cuda", "--model", str(model), "--device", "cuda", "--streamed", "--remove", "4",
                     "--calib", str(args.calib), "--n-samples", "4", "--seq-len", "64", timeout_s=args.timeout)})
        scale = json.loads((ROOT / "reports" / "scale.json").read_text())
        cpu = next((r for r in scale["rows"] if r["model"] == "7b.gguf"), None)
        if cpu is not None:  # the 7B streamed on the CPU takes 20 minutes on 2 cores: the committed scale run is its reference
            add({"model": "7b (synthetic)", "flags": "reports/scale.json (make bench-scale, 2 CPU cores)", "device": "cpu",
                 "dtype": "float32", "execution": cpu["execution"], "removed": cpu["removed"], "wall_s": cpu["wall_s"],
                 "timings_s": {}, "peak_gpu_mib": None, "peak_rss_mib": round(cpu["peak_rss_gib"] * 1024, 1)})
    add({"model": "default", "device": "cpu", **build(args.work / "default-cpu", "--device", "cpu", timeout_s=args.timeout)})
    print(report(payload))


def report(payload: dict) -> str:
    lines = ["# `build` on a CUDA GPU", "", f"GPU: {payload['gpu']}; torch {payload['torch']}. Command: `benchmarks/gpu_check.sh`. "
             f"Host: {payload.get('cpus', '?')} CPU cores.", "",
             "| model | device | dtype | execution | removed | wall s | calibrate | capture | select | compensate | export | peak GPU MiB | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['device']} | | | **failed**: {r['error']} | {r['wall_s']} | | | | | | | |")
            continue
        t = r["timings_s"]
        stages = " | ".join(f"{t[k]:.1f}" if k in t else "" for k in ("calibrate", "capture", "select", "compensate", "export"))
        lines.append(f"| {r['model']} | {r['device']} | {r['dtype']} | {r['execution']} | {r['removed']} | {r['wall_s']} | {stages} | "
                     f"{r['peak_gpu_mib'] or ''} | {r['peak_rss_mib']} |")
    by_model: dict[str, list] = {}
    for r in payload["rows"]:
        by_model.setdefault(r["model"], []).append(r)
    lines += ["", "Flags of each row after `build --target gguf` (defaults otherwise):", ""]
    lines += [f"- {r['model']} on {r['device']}: `{r['flags'] or '(none)'}`" for r in payload["rows"]]
    lines.append("")
    for model, rs in by_model.items():
        gpu = [r["removed"] for r in rs if r["device"].startswith("cuda") and "error" not in r]
        cpu = [r["removed"] for r in rs if r["device"] == "cpu" and "error" not in r]
        if gpu and cpu:
            lines.append(f"- {model}: the GPU run removes {gpu[0]}, the CPU run {cpu[0]}: "
                         + ("the same blocks." if gpu[0] == cpu[0] else "different blocks (bf16 against fp32)."))
    if payload.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
