"""Which GGUF type should the tensors compensation rewrites have, in a GGUF pruned in place?

The default model's source is Q4_1: re-encoding a compensated ffn_down in Q4_1 rounds the fitted
map, which may cost more than Q4_1 costs the dense model. Builds the README main job (the default
build, `--compensated-type auto`: Q8_0 for a tensor whose own type has fewer than 8 bits) once,
replays its decision (`--plan`) with `--compensated-type same` (the source's Q4_1) and `f16`, and measures
every GGUF in llama.cpp on held-out text (the first 24 x 512 tokens of WikiText-2 test, tokenized by
llama.cpp), beside the dense source file, in one run.

    python benchmarks/compensated_type.py   # -> reports/compensated_type.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mi_prun.load import default_model_path
from mi_prun.machine import machine_line
from mi_prun.manifest import PruningManifest
from mi_prun.runtimes import llamacpp

ROOT = Path(__file__).resolve().parents[1]

WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
CLI = [sys.executable, "-m", "mi_prun"]


def build(out: Path, *flags: str) -> PruningManifest:
    if not (out / "pruning.json").is_file():
        subprocess.run([*CLI, "build", "--target", "gguf", "--out", str(out), "--quiet", *flags], check=True, cwd=ROOT)
    return PruningManifest.read(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "bench-compensated-type")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "compensated_type")
    args = p.parse_args(argv)
    start = time.time()
    load_before = list(os.getloadavg())
    default = build(args.work / "default")
    plan = str(args.work / "default" / "pruning.json")
    variants = {"auto (build default)": (args.work / "default", default)}
    for kind in ("same", "f16"):
        out = args.work / kind
        variants[f"{kind} (--compensated-type {kind})"] = (out, build(out, "--plan", plan, "--compensated-type", kind))
    source = default_model_path()
    ids = np.array(llamacpp.tokenize(source, WIKI_TEST.read_text(encoding="utf-8")))
    windows = ids[: args.windows * args.seq_len].reshape(args.windows, args.seq_len)
    rows = [{"variant": "dense source (Q4_1)", "file": source.name, "bytes": source.stat().st_size,
             "ppl": llamacpp.perplexity(source, windows), "replaced": {}}]
    for label, (folder, manifest) in variants.items():
        [e] = manifest.exports
        rows.append({"variant": label, "file": e.file, "bytes": e.bytes, "ppl": llamacpp.perplexity(folder / e.file, windows),
                     "replaced": e.check.get("tensors_replaced", {}), "removed": manifest.removed})
    payload = {"command": "python benchmarks/compensated_type.py", "machine": machine_line("llama.cpp default threads"),
               "loadavg_before_after": [load_before, list(os.getloadavg())],
               "eval": f"{WIKI_TEST.name}, first {args.windows} x {args.seq_len} tokens (llama.cpp tokenizer)",
               "calibration": "self-generated (build default)", "rows": rows, "wall_s": round(time.time() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Type of the compensated tensors in an in-place pruned GGUF", "",
        f"Command: `{payload['command']}`. {payload['machine']}. Held-out text: {payload['eval']}; calibration: "
        f"{payload['calibration']}. Every file measured in llama.cpp in one run ({payload['wall_s']} s); load average (1, 5, 15 min) before {payload['loadavg_before_after'][0]}, after {payload['loadavg_before_after'][1]}.", "",
        "| variant | removed | compensated tensors | size (MiB) | perplexity |", "|---|---|---|---|---|",
    ]
    for r in rows:
        types = ", ".join(sorted(set(r["replaced"].values()))) or "-"
        lines.append(f"| {r['variant']} | {r.get('removed', '-')} | {types} | {r['bytes'] / 2**20:.2f} | {r['ppl']:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
