"""Block against sublayer pruning on the default model, at one byte budget, measured where it ships.

Every build is `jobs.build` (what `mi-prun-edge build --target gguf --remove N [--granularity
sublayer --method M]` runs) with build's defaults otherwise: 16 x 256 tokens of self-generated
calibration, compensation on. The sublayer builds remove at least N blocks' worth of the source's
bytes. Beside them: the model as given and the whole model re-encoded to q4_0 by llama.cpp's
quantizer (the cheap baseline the frontier compares pruning with).

Each GGUF is measured in llama.cpp: perplexity on the first 24 x 512 tokens of WikiText-2 test and
of the licence texts Debian ships (GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3; neither is calibration
text), KL(model as given || model) and top-1 agreement over the first 4 WikiText-2 windows, the KV
cache llama.cpp keeps for 2048 tokens, and decode speed after a 128-token and a 1984-token prompt,
all models side by side, 3 rounds, 2 threads (medians, min-max).

    python benchmarks/sublayers.py --remove 4 --methods mi-prun shortgpt angular   # -> reports/sublayers.{md,json}; about 25 minutes on 2 cores

`--linear-attention K ...` adds `--granularity sublayer --linear-attention K` builds (MI-PRUN) at the
same budget, `--block-at M ...` block builds at other sizes (to set a smaller file beside the block
build of about its size):

    python benchmarks/sublayers.py --remove 8 --methods mi-prun --linear-attention 6 --block-at 9 --report reports/sublayers_linear
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from mi_prun import jobs
from mi_prun.load import default_model_path
from mi_prun.machine import Contention, contention_line, machine_line
from mi_prun.plan import DEFAULT_BUILD_RATIO, Granularity, Method, Plan, Target
from mi_prun.plan import ExportPlan
from mi_prun.runtimes import llamacpp

ROOT = Path(__file__).resolve().parents[1]
TEXTS = {"wikitext2": ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw", "licences": ROOT / "out" / "licence-texts.txt"}
LICENCES = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3")]
WINDOWS, SEQ_LEN, KL_WINDOWS, THREADS = 24, 512, 4, 2
# Builds: (label, granularity, method).
BUILDS = [
    ("block, mi-prun (the default build)", Granularity.block, Method.mi_prun),
    ("sublayer, mi-prun", Granularity.sublayer, Method.mi_prun),
    ("sublayer, shortgpt", Granularity.sublayer, Method.shortgpt),
    ("sublayer, angular", Granularity.sublayer, Method.angular),
    ("sublayer, sleb (BlockPruner's greedy search)", Granularity.sublayer, Method.sleb),
]


def build(work: Path, n: int, granularity: Granularity, method: Method, linear: int = 0) -> tuple[Path, dict]:
    """The GGUF one build ships (reused when `work` already holds it) and what its manifest says."""
    out = work / f"{granularity.value}-{method.value}-{n}{f'-linear{linear}' if linear else ''}"
    if not (out / "pruning.json").is_file():
        plan = Plan.make(remove=n, granularity=granularity, method=method, linear_attention=linear, export=ExportPlan(target=Target.gguf))
        jobs.build(plan, out, force=True)
    manifest = json.loads((out / "pruning.json").read_text())
    sub = manifest.get("sublayers") or {}
    return out / manifest["exports"][0]["file"], {
        "removed_blocks": manifest["removed"], "removed_sublayers": sub.get("removed"), "blocks_before": manifest["blocks_before"],
        "linear_attention": [m["block"] for m in sub.get("linear_attention", [])],
        "selection_s": round(sum(v for k, v in manifest["timings_s"].items() if k in ("calibrate", "capture", "select", "compensate")), 1),
    }


def windows(source: Path) -> dict[str, np.ndarray]:
    out = {}
    for name, path in TEXTS.items():
        ids = np.array(llamacpp.tokenize(source, path.read_text(encoding="utf-8")))
        out[name] = ids[: WINDOWS * SEQ_LEN].reshape(WINDOWS, SEQ_LEN)
    return out


def quality(path: Path, source: Path, held_out: dict[str, np.ndarray]) -> dict:
    row = {}
    for name, w in held_out.items():
        got = llamacpp.compare(path, w, reference=source if name == "wikitext2" else None, kl_windows=KL_WINDOWS, n_threads=THREADS)
        row[f"ppl_{name}"] = round(got["ppl"], 2)
        if name == "wikitext2":
            row["kl"], row["top1"] = round(got["kl_to_dense"], 4), round(got["top1_agreement"], 4)
    return row


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def speed_columns(paths: list[Path]) -> list[dict]:
    """Decode after a short and a long prompt, every model in turn, 3 rounds each."""
    short = llamacpp.speeds(paths, repeats=3, prompt=128, decode=64, n_threads=THREADS)
    long = llamacpp.speeds(paths, repeats=3, prompt=2048 - 64, decode=64, n_threads=THREADS)
    return [{"decode_tok_s_128": s["decode_tok_s"], "decode_tok_s_2048": l["decode_tok_s"]} for s, l in zip(short, long)]


def report(payload: dict) -> str:
    lines = [
        f"# Block against sublayer pruning, {payload['remove']} blocks' worth of bytes, default model",
        "",
        f"Command: `{payload['command']}`. Machine: {payload['machine']}. {payload['contention']}. Wall time {payload['wall_s']} s.",
        "",
        "Every build through `jobs.build` with build's defaults (16 x 256 tokens of self-generated calibration, compensation "
        "on); sublayer builds remove at least that many blocks' worth of the source's bytes (`--granularity sublayer`). "
        f"Measured in llama.cpp: perplexity on the first {WINDOWS} x {SEQ_LEN} tokens of WikiText-2 test and of the licence texts "
        f"(llama.cpp's tokenizer), KL and top-1 against the model as given over the first {KL_WINDOWS} WikiText-2 windows, "
        "the KV cache llama.cpp keeps for 2048 tokens (its state after 2048 tokens less after one), decode speed after a "
        "128- and a 1984-token prompt (median of 3 rounds, min-max, all models in turn, 2 threads).",
        "",
        "| model | removed | MiB | wikitext-2 ppl | licences ppl | KL | top-1 | KV cache @2048, MiB | decode tok/s @128 | decode tok/s @2048 | selection s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["rows"]:
        removed = ", ".join(r["removed_sublayers"]) if r.get("removed_sublayers") else str(r.get("removed_blocks", "-"))
        if r.get("linear_attention"):
            removed += "; attention as linear maps: " + ", ".join(f"{b}.attention" for b in r["linear_attention"])
        lines.append(
            f"| {r['label']} | {removed} | {r['mib']:.1f} | {r['ppl_wikitext2']:.2f} | {r['ppl_licences']:.2f} | {r['kl']:.4f} | "
            f"{r['top1']:.1%} | {r['kv_mib']:.1f} | {median_range(r['decode_tok_s_128'])} | {median_range(r['decode_tok_s_2048'])} | "
            f"{r.get('selection_s', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--remove", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=[m.value for _, g, m in BUILDS if g is Granularity.sublayer],
                        help="sublayer methods to build (sleb takes one pass per remaining sublayer and step: hours here)")
    parser.add_argument("--linear-attention", type=int, nargs="*", default=[],
                        help="also sublayer MI-PRUN builds with --linear-attention K, for each K")
    parser.add_argument("--block-at", type=int, nargs="*", default=[], help="also block builds removing M blocks, for each M")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "sublayer-work")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "sublayers")
    args = parser.parse_args()
    start, contention = time.perf_counter(), Contention()
    args.work.mkdir(parents=True, exist_ok=True)
    TEXTS["licences"].parent.mkdir(parents=True, exist_ok=True)
    TEXTS["licences"].write_text("".join(p.read_text(encoding="utf-8") for p in LICENCES), encoding="utf-8")
    source = Path(default_model_path())
    q4_0 = args.work / "whole-model.q4_0.gguf"
    if not q4_0.is_file():
        llamacpp.quantize(source, q4_0, "LLAMA_FTYPE_MOSTLY_Q4_0")
    rows = [{"label": "model as given (q4_1)", "file": source}, {"label": "whole model re-encoded to q4_0", "file": q4_0}]
    for label, granularity, method in BUILDS:
        if granularity is Granularity.sublayer and method.value not in args.methods:
            continue
        path, info = build(args.work, args.remove, granularity, method)
        if Plan.make(ratio=DEFAULT_BUILD_RATIO).n_remove(info["blocks_before"]) != args.remove:
            label = label.replace(" (the default build)", "")
        rows.append({"label": label, "file": path, **info})
        print(label, info, flush=True)
    extra = [(f"sublayer, mi-prun, --linear-attention {k}", args.remove, Granularity.sublayer, k) for k in args.linear_attention]
    extra += [(f"block, mi-prun, {m} blocks", m, Granularity.block, 0) for m in args.block_at]
    for label, n, granularity, linear in extra:
        path, info = build(args.work, n, granularity, Method.mi_prun, linear)
        rows.append({"label": label, "file": path, **info})
        print(label, info, flush=True)
    held_out = windows(source)
    for r in rows:
        r.update(quality(r["file"], source, held_out), mib=r["file"].stat().st_size / 2**20, kv_mib=llamacpp.kv_cache_bytes(r["file"]) / 2**20)
        print(r["label"], {k: v for k, v in r.items() if k.startswith(("ppl", "kv"))}, flush=True)
    for r, s in zip(rows, speed_columns([r["file"] for r in rows])):
        r.update(s)
    command = f"python benchmarks/sublayers.py --remove {args.remove} --methods {' '.join(args.methods)}"
    command += f" --linear-attention {' '.join(map(str, args.linear_attention))}" if args.linear_attention else ""
    command += f" --block-at {' '.join(map(str, args.block_at))}" if args.block_at else ""
    command += f" --report {args.report}" if args.report != ROOT / "reports" / "sublayers" else ""
    payload = {"command": command, "remove": args.remove,
               "machine": machine_line(f"llama.cpp with {THREADS} threads"), "contention": contention_line(contention.summary()),
               "wall_s": round(time.perf_counter() - start), "rows": [{**r, "file": str(r["file"].name)} for r in rows]}
    args.report.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    args.report.with_suffix(".md").write_text(report(payload))
    print(report(payload))


if __name__ == "__main__":
    main()
