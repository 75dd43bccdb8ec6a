"""ONNX exports of the dense and pruned default model: export time, size, and fp32 vs int4 perplexity.

Uses the models `benchmarks/latency.py` builds (same `--work` folder, built here if missing):
dense and MI-PRUN with 4 and 8 blocks removed, as `mi-prun-edge prune` writes them (compensated).
Each is exported as `mi-prun-edge export --target onnx --onnx-precision P` does (`export_folder`:
the model builder, then the export checked in onnxruntime and onnxruntime-genai). Perplexity is
computed by plain onnxruntime on the first `--windows` windows of 512 tokens of wiki.test.raw, next
to transformers on the same windows.

    .venv/bin/python benchmarks/onnx_quality.py            # writes reports/onnx_quality.{md,json}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import latency  # noqa: E402
from exporters.onnx_export import OnnxPrecision, count_matmul_nbits, onnx_perplexity  # noqa: E402
from mi_prun.calibration import tokenize_text  # noqa: E402
from mi_prun.evaluate import eval_windows, perplexity  # noqa: E402
from mi_prun.export import export_folder  # noqa: E402
from mi_prun.load import load_model  # noqa: E402
from mi_prun.plan import Target  # noqa: E402
from mi_prun.progress import Reporter  # noqa: E402

WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remove", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-work")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "onnx_quality")
    args = parser.parse_args(argv)
    reporter = Reporter()
    bench_args = latency.parse_args(["--remove", *map(str, args.remove), "--work", str(args.work)])
    variants, removed = latency.build_variants(bench_args, reporter)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(variants["dense"])
    windows = eval_windows(tokenize_text(tokenizer, WIKI_TEST.read_text(encoding="utf-8")), 512, args.windows)
    rows = []
    for name, hf in variants.items():
        loaded = load_model(str(hf))
        row = {"model": name, "removed": removed.get(name, []), "transformers_ppl": perplexity(loaded.runner, windows).ppl}
        del loaded
        for precision in OnnxPrecision:
            out = args.work / "onnx-quality" / f"{name}.{precision.value}"
            export = export_folder(hf, Target.onnx, out, None, True, reporter, onnx_precision=precision)
            target = out / export.file
            row[precision.value] = {
                "export_s": export.seconds, "bytes": export.bytes, "matmul_nbits": count_matmul_nbits(target),
                "ppl": onnx_perplexity(target, windows.numpy()),
            }
            reporter.say(json.dumps({name: row[precision.value]}))
        rows.append(row)

    payload = {
        "command": " ".join(["python benchmarks/onnx_quality.py", *argv]),
        "evaluation": f"first {windows.shape[0]} windows x 512 tokens of wiki.test.raw ({windows.shape[0] * 511} predicted tokens)",
        "variants": f"dense: the source dequantized; pruned-N: `{latency.prune_command(bench_args)}` (selection, calibration "
                    "and compensation of the build default)",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# ONNX exports (onnxruntime-genai model builder, CPU): export time, size, perplexity",
        "",
        f"Command: `{payload['command']}`  ",
        f"Evaluation: {payload['evaluation']}, perplexity by plain onnxruntime; transformers fp32 on the same windows for reference.  ",
        f"Models: {payload['variants']}.",
        "",
        "| model | removed | transformers ppl | fp32 ppl | int4 ppl | int4/fp32 | fp32 MiB | int4 MiB | export + check s fp32 / int4 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, q = r["fp32"], r["int4"]
        lines.append(f"| {r['model']} | {r['removed']} | {r['transformers_ppl']:.2f} | {f['ppl']:.2f} | {q['ppl']:.2f} | "
                     f"{q['ppl'] / f['ppl']:.3f} | {f['bytes'] / 2**20:.1f} | {q['bytes'] / 2**20:.1f} | {f['export_s']} / {q['export_s']} |")
    lines.append("")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
