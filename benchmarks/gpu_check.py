"""What `build` does on a CUDA GPU: wall time per stage and where it went (pruning.json's
profile_s), block-forwards against the least the proposals need, peak GPU memory, and whether it
removes the blocks the CPU run removes (bf16 on the GPU against fp32 on the CPU, so a near tie may
differ).

Every build is the product's own command (`python -m mi_prun build --target gguf`), as a user runs it:
the default model with its default settings on `--device DEVICE` and on `--device cpu`; the
7B-shaped synthetic Llama of benchmarks/synthetic.py (random weights: time and memory only) on the
device at the build's default calibration size (16 x 256 tokens of wiki.valid), memory choice left
to the tool (on a GPU with room, every block resident and dequantized once on the device). Run
through benchmarks/gpu_check.sh; `--device cpu --shape 0.3b` runs the same script here, small.
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
WINDOWS, SEQ_LEN = 16, 256  # the build's default calibration size
PASS_PARTS = ("forward", "read", "dequantize", "copy to device")


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
    capture = m.get("profile_s", {}).get("capture", {})
    forwards = m.get("block_forwards", {})
    return {"flags": " ".join(flags), "wall_s": round(time.time() - start, 1), "removed": m["removed"], "device": m["device"],
            "dtype": m["dtype"], "execution": m["execution"], "timings_s": m["timings_s"], "peak_gpu_mib": m.get("peak_gpu_mib"),
            "peak_rss_mib": m["peak_rss_mib"], "profile_s": m.get("profile_s", {}),
            "forward_pass_s": round(sum(capture.get(p, 0.0) for p in PASS_PARTS), 2),
            "block_forwards": forwards.get("capture", 0) + forwards.get("select", 0),
            "block_forwards_minimum": m["selection"].get("block_forwards_minimum")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda", help="the device of the builds (cuda; cpu to try the script where there is no GPU)")
    p.add_argument("--shape", default="7b", choices=sorted(synthetic.SHAPES), help="the synthetic model's shape (7b)")
    p.add_argument("--skip-synthetic", "--skip-7b", action="store_true", help="the default model only")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "gpu-check")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu")
    p.add_argument("--calib", type=Path, default=WIKI_VALID, help="calibration text of the synthetic build (wiki.valid.tokens)")
    p.add_argument("--timeout", type=float, default=300, help="seconds one build may take before it is reported unfinished")
    args = p.parse_args(argv)
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "none (--device cpu)"
    payload = {"gpu": gpu, "torch": torch.__version__, "cpus": os.cpu_count(), "rows": []}

    def add(row: dict) -> None:  # the report is rewritten after every build: a cut-short lease keeps what was measured
        payload["rows"].append(row)
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(report(payload) + "\n")

    # The device runs first: on a short lease they are the figures nobody has; the CPU run is the reference.
    add({"model": "default", **build(args.work / f"default-{args.device}", "--device", args.device, timeout_s=args.timeout)})
    if not args.skip_synthetic:
        model = args.work / f"llama-{args.shape}.Q4_0.gguf"
        if not model.exists():
            synthetic.main(["--shape", args.shape, "--format", "gguf", "--out", str(model)])
        add({"model": f"{args.shape} (synthetic)",
             **build(args.work / f"{args.shape}-{args.device}", "--model", str(model), "--device", args.device, "--remove", "4",
                     "--calib", str(args.calib), "--n-samples", str(WINDOWS), "--seq-len", str(SEQ_LEN), timeout_s=args.timeout)})
    if args.device != "cpu":
        add({"model": "default", **build(args.work / "default-cpu", "--device", "cpu", timeout_s=args.timeout)})
    print(report(payload))


def report(payload: dict) -> str:
    lines = ["# `build` on a CUDA GPU", "", f"GPU: {payload['gpu']}; torch {payload['torch']}. Command: `benchmarks/gpu_check.sh`. "
             f"Host: {payload.get('cpus', '?')} CPU cores.", "",
             "| model | device | dtype | execution | removed | wall s | calibrate | capture | select | compensate | export | "
             "one forward pass s | block-forwards (least) | peak GPU MiB | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('device', '')} | | | **failed**: {r['error']} | {r['wall_s']} | | | | | | | | | |")
            continue
        t = r["timings_s"]
        stages = " | ".join(f"{t[k]:.1f}" if k in t else "" for k in ("calibrate", "capture", "select", "compensate", "export"))
        least = r.get("block_forwards_minimum")
        forwards = f"{r.get('block_forwards')} ({least})" if least else ""
        lines.append(f"| {r['model']} | {r['device']} | {r['dtype']} | {r['execution']} | {r['removed']} | {r['wall_s']} | {stages} | "
                     f"{r.get('forward_pass_s', '')} | {forwards} | {r['peak_gpu_mib'] or ''} | {r['peak_rss_mib']} |")
    lines += ["", "Flags of each row after `build --target gguf` (defaults otherwise):", ""]
    lines += [f"- {r['model']} on {r.get('device', '?')}: `{r['flags'] or '(none)'}`" for r in payload["rows"]]
    lines += ["", "Where each build's seconds went (all stages, pruning.json's profile_s; \"other\": MI estimation, selection, bookkeeping):", ""]
    for r in payload["rows"]:
        if "error" in r or not r.get("profile_s"):
            continue
        total: dict[str, float] = {}
        for parts in r["profile_s"].values():
            for part, seconds in parts.items():
                if part != "wall":
                    total[part] = total.get(part, 0.0) + seconds
        lines.append(f"- {r['model']} on {r['device']}: " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(total.items(), key=lambda kv: -kv[1])))
    lines.append("")
    by_model: dict[str, list] = {}
    for r in payload["rows"]:
        by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        gpu = [r["removed"] for r in rs if r.get("device", "").startswith("cuda") and "error" not in r]
        cpu = [r["removed"] for r in rs if r.get("device") == "cpu" and "error" not in r]
        if gpu and cpu:
            lines.append(f"- {model}: the GPU run removes {gpu[0]}, the CPU run {cpu[0]}: "
                         + ("the same blocks." if gpu[0] == cpu[0] else "different blocks (bf16 against fp32)."))
    if payload.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
