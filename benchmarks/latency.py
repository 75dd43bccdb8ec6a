"""`make bench`: latency and memory of the dense vs MI-PRUN-pruned model in each edge runtime.

For the model (default: the embedded SmolLM2-135M-Instruct) this builds the dense checkpoint and
pruned ones (`--remove`) exactly as `mi-prun-edge prune --remove N` does with the build's default
calibration (`--calib self`, 16 x 256; `--calib` changes it; MI-PRUN, verified and compensated,
checkpoint + pruning.json), exports each as
`mi-prun-edge export` does (export, then a check in its runtime), then measures:

* prefill latency for 128- and 512-token prompts, time to first token and decode tokens/s over
  `--decode-tokens` greedy tokens (128-token prompt). One worker process per runtime holds all
  variants; after a warm-up it runs `--repeats` rounds in alternating order (dense, pruned-4,
  pruned-8, dense, ...) with `--threads` threads. Medians and min-max spread are reported, and the
  speedup is the ratio of medians measured in that same process.
* peak resident memory: a fresh process per runtime and model loads it, prefills 512 tokens and
  decodes 16 (llama.cpp with use_mmap=False, so weights count in full; RSS before loading is
  reported as the runtime's own base).
* artifact size on disk, and the ideal speedup predicted from the FLOPs of what was removed
  (matmul FLOPs per token: blocks + output head, the head counted at every prompt position where
  the runtime computes logits there; attention-score FLOPs at the measured context lengths).

    .venv/bin/python benchmarks/latency.py                 # writes reports/bench.{md,json} and two PNG charts
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mi_prun import jobs
from mi_prun.load import load_model
from mi_prun.machine import Contention, machine_line
from mi_prun.manifest import MANIFEST_NAME, ExportInfo, PruningManifest
from mi_prun.plan import CalibrationSpec, ExportPlan, Plan
from mi_prun.progress import Reporter
from mi_prun.runtimes.formats import GGUFType, OnnxPrecision, Target

from latency_report import write_report

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("latency_worker.py")

# runtime label -> (worker runtime, artifact format, computes logits at every prompt position)
RUNTIMES = {
    "torch-fp32": ("torch", "hf", True),
    "llama.cpp-f16": ("llama.cpp", GGUFType.f16, False),
    "llama.cpp-q8_0": ("llama.cpp", GGUFType.q8_0, False),
    "llama.cpp-q4_0": ("llama.cpp", GGUFType.q4_0, False),
    "ort-genai-fp32": ("ort-genai", OnnxPrecision.fp32, True),
    "ort-genai-int4": ("ort-genai", OnnxPrecision.int4, True),
}
RUNTIME_MODULES = {"torch": "torch", "llama.cpp": "llama_cpp", "ort-genai": "onnxruntime_genai"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model source (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--remove", type=int, nargs="+", default=[4, 8], help="blocks removed in the pruned variants")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--calib", default="self",
                   help="calibration of the pruned variants (default: self, the build default; a file labels them by it)")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-work",
                   help="built models and exports (reused while their plan is the same; another --model needs another --work)")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "bench")
    return p.parse_args(argv)


def variant_plan(args, n: int) -> Plan:
    """The plan of `mi-prun-edge prune --model M --calib C --n-samples 16 --seq-len 256 --remove n`:
    the tool's defaults (MI-PRUN, verified and compensated as shipped) but for calibration and N."""
    return Plan.make(model=args.model, remove=n, calibration=CalibrationSpec(args.calib, 16, 256))


def prune_command(args) -> str:
    """The command line equivalent of `variant_plan`."""
    model = f"--model {args.model} " if args.model else ""
    return f"mi-prun-edge prune {model}--calib {args.calib} --n-samples 16 --seq-len 256 --remove N"


def recorded_plan(folder: Path) -> Plan | None:
    """The plan in a variant folder's pruning.json (None: no readable one, e.g. built by an older version)."""
    try:
        return PruningManifest.read(folder).plan
    except (OSError, ValueError):  # missing, not JSON, or not a pruning.json of this version
        return None


def save_dense(model: str | None, folder: Path) -> None:
    """The dense model as loaded, saved as a Hugging Face folder (no command writes an unpruned checkpoint)."""
    loaded = load_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def build_variants(args, reporter) -> tuple[dict[str, Path], dict[str, list[int]]]:
    """Dense and pruned Hugging Face folders, and the blocks each pruned one removed.

    A pruned variant is what `mi-prun-edge prune` writes (`jobs.prune`: the model loaded as the plan
    says, checkpoint and pruning.json); it is reused when its pruning.json records the same plan. The
    dense folder is the loaded model saved as is, reused when present (use another --work for another --model).
    """
    work = args.work
    variants = {"dense": work / "dense"} | {f"pruned-{n}": work / f"pruned-{n}" for n in args.remove}
    plans = {f"pruned-{n}": variant_plan(args, n) for n in args.remove}
    stale = [v for v, plan in plans.items() if recorded_plan(variants[v]) != plan]
    if not (variants["dense"] / "config.json").is_file():
        save_dense(args.model, variants["dense"])
    for v in stale:
        reporter.say(f"building {v}: {plans[v].remove} blocks removed, as `mi-prun-edge prune` does")
        jobs.prune(plans[v], variants[v], force=True, reporter=reporter)
    removed = {v: PruningManifest.read(variants[v]).removed for v in plans}
    return variants, removed


def artifact(label: str, variant: str, hf: Path, work: Path, reporter) -> Path:
    """The runtime file (or folder) of a variant, exported as `mi-prun-edge export` does
    (`jobs.export`: export, then the written artifact checked in its runtime).

    An export is reused while the pruning.json it was made from (copied beside it) is the variant's own."""
    _, fmt, _ = RUNTIMES[label]
    if fmt == "hf":
        return hf
    if isinstance(fmt, GGUFType):
        target, gguf_type, precision = Target.gguf, fmt, OnnxPrecision.int4
    else:
        target, gguf_type, precision = Target.onnx, None, fmt
    out = work / "exports" / f"{variant}.{fmt.value}"
    if not export_current(out, hf):
        reporter.say(f"exporting {variant} to {target.value} {fmt.value}")
        jobs.export(hf, ExportPlan(target=target, gguf_type=gguf_type, onnx_precision=precision), out, force=True, reporter=reporter)
    return out / ExportInfo.model_validate_json((out / "export.json").read_text()).file


def export_current(out: Path, hf: Path) -> bool:
    """Whether `out` holds an export of the checkpoint now in `hf` (same pruning.json, or none in either)."""
    if not (out / "export.json").is_file():
        return False
    made_from, source = out / MANIFEST_NAME, hf / MANIFEST_NAME
    if made_from.is_file() != source.is_file():
        return False
    return not source.is_file() or made_from.read_bytes() == source.read_bytes()


def size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in {".safetensors", ".onnx", ".data", ".bin"})


def worker(mode: str, runtime: str, models: list[Path], args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(WORKER), mode, "--runtime", runtime, "--models", *map(str, models),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{runtime} worker failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def flops_model(hf: Path) -> dict:
    """Parameter counts of a Hugging Face folder, for the ideal speedup."""
    from safetensors import safe_open

    config = json.loads((hf / "config.json").read_text())
    block, other = 0, 0
    for f in hf.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                if ".layers." in key:
                    block += n
                else:
                    other += n
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads = config["num_attention_heads"] * config.get("head_dim", hidden // config["num_attention_heads"])
    return {"blocks": config["num_hidden_layers"], "block_params": block, "head_params": hidden * vocab, "attn_width": heads}


def ideal_flops(m: dict, prompt: int, logits_everywhere: bool, decode: bool) -> float:
    """Matmul + attention-score FLOPs for one prefill of `prompt` tokens, or one decode token at that context."""
    if decode:
        return 2 * m["block_params"] + 2 * m["head_params"] + 4 * prompt * m["attn_width"] * m["blocks"]
    head = m["head_params"] * (prompt if logits_everywhere else 1)
    return prompt * 2 * m["block_params"] + 2 * head + 2 * prompt * prompt * m["attn_width"] * m["blocks"]


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


METRICS = ("prefill_128_s", "prefill_512_s", "ttft_s", "decode_tok_s")


def rerender(argv: list[str]) -> None:
    """`--render [OUT]`: the report of a finished run, re-rendered from its JSON."""
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "reports" / "bench"
    write_report(json.loads(out.with_suffix(".json").read_text()), out)


def remeasure_memory() -> None:
    """`--memory-only`: peak memory of a finished run's artifacts, measured again into its report."""
    out = ROOT / "reports" / "bench"
    payload = json.loads(out.with_suffix(".json").read_text())
    threads = payload["settings"]["threads"]
    args = parse_args(["--threads", str(threads)])
    for label, rows in payload["results"].items():
        for row in rows.values():
            row["memory"] = worker("memory", RUNTIMES[label][0], [ROOT / row["artifact"]], args)
    payload["memory_command"] = "python benchmarks/latency.py --memory-only"
    write_report(payload, out)


def add_ratios(rows: dict, flops: dict, logits_everywhere: bool) -> None:
    """Each variant's measured speedup over dense (ratio of medians) and the FLOP-predicted ideal."""
    dense = rows["dense"]
    for v, row in rows.items():
        f, fd = flops[v], flops["dense"]
        row["speedup"] = {
            "prefill_512": dense["prefill_512_s"]["median"] / row["prefill_512_s"]["median"],
            "prefill_128": dense["prefill_128_s"]["median"] / row["prefill_128_s"]["median"],
            "decode": row["decode_tok_s"]["median"] / dense["decode_tok_s"]["median"],
            "ttft": dense["ttft_s"]["median"] / row["ttft_s"]["median"],
        }
        row["ideal"] = {
            "prefill_512": ideal_flops(fd, 512, logits_everywhere, False) / ideal_flops(f, 512, logits_everywhere, False),
            "prefill_128": ideal_flops(fd, 128, logits_everywhere, False) / ideal_flops(f, 128, logits_everywhere, False),
            "decode": ideal_flops(fd, 192, logits_everywhere, True) / ideal_flops(f, 192, logits_everywhere, True),
        }


def measure_runtime(label: str, variants: dict[str, Path], flops: dict, args, reporter) -> dict:
    """Every variant in one runtime: exported, timed in one worker (alternating rounds), peak memory
    in a fresh worker each, size on disk, speedups."""
    runtime, _, logits_everywhere = RUNTIMES[label]
    paths = {v: artifact(label, v, hf, args.work, reporter) for v, hf in variants.items()}
    reporter.say(f"timing {label} ({args.repeats} alternating rounds)")
    timing = worker("time", runtime, list(paths.values()), args)
    rows = {}
    for v, path in paths.items():
        runs = timing["runs"][str(path)]
        memory = worker("memory", runtime, [path], args)
        rows[v] = {
            "artifact": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
            "bytes": size_on_disk(path),
            **{m: summarize([r[m] for r in runs]) for m in METRICS},
            "memory": memory,
        }
    add_ratios(rows, flops, logits_everywhere)
    return rows


def installed(label: str, reporter) -> bool:
    """Whether the runtime's module imports (saying so when it does not)."""
    module = RUNTIME_MODULES[RUNTIMES[label][0]]
    try:
        __import__(module)
    except ImportError:
        reporter.say(f"skipping {label}: {module} is not installed")
        return False
    return True


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--render"]:
        rerender(argv)
        return
    if argv[:1] == ["--memory-only"]:
        remeasure_memory()
        return
    args = parse_args(argv)
    reporter = Reporter()
    started = time.perf_counter()
    contention = Contention()
    args.work.mkdir(parents=True, exist_ok=True)
    variants, removed = build_variants(args, reporter)
    flops = {v: flops_model(p) for v, p in variants.items()}

    results, skipped = {}, []
    for label in args.runtimes:
        if not installed(label, reporter):
            skipped.append(label)
            continue
        rows = results[label] = measure_runtime(label, variants, flops, args, reporter)
        reporter.say(json.dumps({v: (round(r["speedup"]["decode"], 3), round(r["ideal"]["decode"], 3)) for v, r in rows.items()}))

    payload = {
        "command": " ".join(["python benchmarks/latency.py", *argv]),
        "machine": machine_line(f"{args.threads} threads pinned per runtime"),
        "model": args.model or "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantized for the exports)",
        "removed": removed,
        "pruned_with": prune_command(args),
        "flops": flops,
        "settings": {"repeats": args.repeats, "threads": args.threads, "decode_tokens": args.decode_tokens, "prompts": [128, 512]},
        "skipped": skipped,
        "wall_s": round(time.perf_counter() - started, 1),
        "contention": contention.summary(),
        "results": results,
    }
    write_report(payload, args.out)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
