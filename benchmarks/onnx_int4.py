"""int4 ONNX settings of onnxruntime-genai's model builder against fp32, on the default model.

Each setting is exported by the product's own exporter (`exporters.onnx_export.export_onnx`, the
model builder with those `--extra_options`) from the dense default model and its 4-blocks-removed
build (the models `benchmarks/latency.py` builds, as `mi-prun-edge prune` writes them); perplexity by
plain onnxruntime on the first `--windows` windows of 512 tokens of wiki.test.raw, as in
reports/onnx_quality.md. The best setting becomes `DEFAULT_INT4`.

    .venv/bin/python benchmarks/onnx_int4.py        # writes reports/onnx_int4.{md,json}
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import latency  # noqa: E402
from exporters.onnx_export import DEFAULT_INT4, Int4Settings, OnnxPrecision, export_onnx, folder_bytes, onnx_perplexity  # noqa: E402
from machine import Contention, contention_line, machine_line  # noqa: E402
from mi_prun.calibration import tokenize_text  # noqa: E402
from mi_prun.evaluate import eval_windows  # noqa: E402
from mi_prun.progress import Reporter  # noqa: E402

WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"

SETTINGS = {
    "builder default (int8 activations)": Int4Settings(),
    "fp32 activations": Int4Settings(accuracy_level=1),
    "fp32 act., k_quant": Int4Settings(accuracy_level=1, algo_config="k_quant"),
    # The default model's weights are Q4_1 (a scale and a minimum per 32 weights): does an asymmetric
    # grid fit them better? (Asymmetric int4 of a shared embedding/head matrix does not load in
    # onnxruntime, so the embedding gets its own matrix.)
    "asymmetric, own embedding": Int4Settings(is_symmetric=False, shared_embeddings=False),
    # The head (tied to the embedding here: a fifth of the weights) is the output-sensitive matrix.
    "head unquantized": Int4Settings(nodes_to_exclude="/lm_head/MatMul"),
    "own embedding, head int8": Int4Settings(shared_embeddings=False, mixed_precision="last_matmul:int8"),
    "mixed layers int8": Int4Settings(mixed_precision="mixed_layers:int8"),
    "own embedding, head + mixed layers int8": Int4Settings(shared_embeddings=False, mixed_precision="last_matmul:int8,mixed_layers:int8"),
    "own embedding int4, head + mixed layers int8": DEFAULT_INT4,
}
# Measured once and left out of the sweep: a tied head in int8 (last_matmul:int8 with the shared
# matrix) does not load in onnxruntime; block size 16 with the head unquantized was no better than 32.


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-work")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "onnx_int4")
    parser.add_argument("--models", nargs="*", default=["dense", "pruned-4"], help="which of dense, pruned-4")
    parser.add_argument("--settings", nargs="*", help="only these settings (names as in SETTINGS); fp32 always runs")
    args = parser.parse_args(argv)
    reporter, contention = Reporter(), Contention()
    bench_args = latency.parse_args(["--remove", "4", "--work", str(args.work)])
    variants, removed = latency.build_variants(bench_args, reporter)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(variants["dense"])
    windows = eval_windows(tokenize_text(tokenizer, WIKI_TEST.read_text(encoding="utf-8")), 512, args.windows).numpy()
    rows = []
    chosen = {k: v for k, v in SETTINGS.items() if not args.settings or k in args.settings}
    for name, hf in variants.items():
        if name not in args.models:
            continue
        work = args.work / "onnx-int4" / name
        runs = {"fp32": (OnnxPrecision.fp32, Int4Settings())} | {k: (OnnxPrecision.int4, v) for k, v in chosen.items()}
        for label, (precision, settings) in runs.items():
            out = work / label.replace(" ", "_").replace(",", "").replace(".", "").replace("(", "").replace(")", "")
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            row = {"model": name, "removed": removed.get(name, []), "setting": label,
                   "options": settings.extra_options() if precision is OnnxPrecision.int4 else []}
            try:
                export_onnx(hf, out, precision, work / ".cache", settings)
                row.update(bytes=folder_bytes(out), export_s=round(time.perf_counter() - start, 1), ppl=onnx_perplexity(out, windows))
            except Exception as err:  # a setting the builder or onnxruntime rejects is a result too
                row.update(error=str(err).splitlines()[0][:300], ppl=float("nan"), bytes=0, export_s=None)
            rows.append(row)
            reporter.say(json.dumps(row))
            shutil.rmtree(out, ignore_errors=True)  # hundreds of MB each: the numbers are what is kept
    for r in rows:
        fp32 = next(x for x in rows if x["model"] == r["model"] and x["setting"] == "fp32")
        r["ratio_to_fp32"] = r["ppl"] / fp32["ppl"]
    payload = {
        "command": " ".join(["python benchmarks/onnx_int4.py", *argv]),
        "evaluation": f"first {len(windows)} windows x 512 tokens of wiki.test.raw, perplexity by plain onnxruntime",
        "machine": machine_line("onnxruntime default threads"), "contention": contention.summary(), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# ONNX int4 settings of the model builder against fp32",
        "",
        f"Command: `{payload['command']}`. Evaluation: {payload['evaluation']}. Models: dense = the default SmolLM2-135M "
        f"(Q4_1 GGUF dequantized to fp32); pruned-4 = `{latency.prune_command(bench_args)}`. Machine: {payload['machine']}.",
        contention_line(payload["contention"]),
        "",
        "The product's default int4 (`exporters.onnx_export.DEFAULT_INT4`) is marked **default**.",
        "",
        "| model | setting | builder options | ppl | x fp32 | MiB | export s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['setting']} | {' '.join(r['options'])} | failed: {r['error']} | | | |")
            continue
        setting = f"**default**: {r['setting']}" if r["options"] == DEFAULT_INT4.extra_options() else r["setting"]
        lines.append(f"| {r['model']} | {setting} | {' '.join(r['options'])} | {r['ppl']:.2f} | {r['ratio_to_fp32']:.3f} | "
                     f"{r['bytes'] / 2**20:.1f} | {r['export_s']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
