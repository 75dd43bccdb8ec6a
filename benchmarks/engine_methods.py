"""Perplexity after pruning, every selection method, on the default model (engine acceptance run).

Calibration: `wiki.valid.tokens` windows. Evaluation: the first 24 windows of 512 tokens of
`wiki.test.raw` (as in the engine issue's table), and the same size of a second, non-wiki text
(the GPL-3, Apache-2.0, MPL-2.0 and GFDL-1.3 licence texts shipped by Debian) to check that the
ordering holds off WikiText.

    .venv/bin/python benchmarks/engine_methods.py --n 4 8     # writes reports/engine_methods.{md,json}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mi_prun.blockset import blocks_kept, keep_indices  # noqa: E402
from mi_prun.calibration import CalibrationSpec, calibration_batches, tokenize_text  # noqa: E402
from mi_prun.evaluate import eval_windows, perplexity  # noqa: E402
from mi_prun.load import load_model  # noqa: E402
from mi_prun.progress import Reporter  # noqa: E402
from mi_prun.prune import Method, PruneOptions, score_model, select_blocks  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext2"
LICENCES = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--methods", nargs="+", default=[m.value for m in Method])
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-calib-samples", type=int, default=4, help="calibration windows for sleb/ppl (each candidate costs a pass)")
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "engine_methods")
    args = parser.parse_args()
    reporter = Reporter()
    started = time.perf_counter()

    loaded = load_model(args.model)
    n_blocks = loaded.model.config.num_hidden_layers
    texts = {"wikitext2-test": (WIKI / "wiki.test.raw").read_text(encoding="utf-8")}
    if all(p.is_file() for p in LICENCES):
        texts["licences"] = "\n\n".join(p.read_text(encoding="utf-8") for p in LICENCES)
    evals = {k: eval_windows(tokenize_text(loaded.tokenizer, t), 512, args.eval_windows) for k, t in texts.items()}

    def evaluate(removed: list[int]) -> dict[str, float]:
        with blocks_kept(loaded.model, loaded.spec, keep_indices(n_blocks, removed)):
            return {k: round(perplexity(loaded.model, w).ppl, 2) for k, w in evals.items()}

    base = PruneOptions(calibration=CalibrationSpec(str(WIKI / "wiki.valid.tokens"), args.calib_samples, 256))
    calib = calibration_batches(loaded.model, loaded.tokenizer, base.calibration)
    small = calib[:: max(1, args.calib_samples // args.eval_calib_samples)][: args.eval_calib_samples]
    scores = score_model(loaded, calib, base, reporter)

    rows = [{"method": "dense", "n": 0, "removed": [], "ppl": evaluate([]), "select_s": 0.0, "forward_passes": 0}]
    for n in args.n:
        for name in args.methods:
            method = Method(name)
            options = replace(base, method=method, remove=n)
            ids = small if method in (Method.sleb, Method.ppl) else calib
            t0 = time.perf_counter()
            removed, info = select_blocks(loaded, scores, ids, options, n, reporter)
            select_s = time.perf_counter() - t0
            row = {"method": name, "n": n, "removed": removed, "select_s": round(select_s, 1), "forward_passes": info.forward_passes,
                   "calib_windows": int(ids.shape[0])}
            if info.candidates:
                row["candidates"] = [c.model_dump() for c in info.candidates]
            row["ppl"] = evaluate(removed)
            rows.append(row)
            reporter.say(json.dumps(row))

    payload = {
        "command": "python benchmarks/engine_methods.py " + " ".join(sys.argv[1:]),
        "model": loaded.source.describe(),
        "eval": {k: f"first {w.shape[0]} windows x 512 tokens ({w.shape[0] * 511} predicted)" for k, w in evals.items()},
        "calibration": f"{args.calib_samples} x 256 tokens of wiki.valid.tokens (sleb, ppl: {args.eval_calib_samples} of them)",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "wall_s": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    names = list(evals)
    lines = [
        "# Perplexity after block removal, by method",
        "",
        f"Command: `{payload['command']}`  ",
        f"Model: {payload['model']}. Calibration: {payload['calibration']}.  ",
        "Evaluation: " + "; ".join(f"{k}: {v}" for k, v in payload["eval"].items()) + f". Wall time {payload['wall_s']} s.",
        "",
        "| method | N | removed | " + " | ".join(f"ppl {k}" for k in names) + " | select s | forward passes |",
        "|---|---|---|" + "---|" * len(names) + "---|---|",
        *[
            f"| {r['method']} | {r['n']} | {r['removed']} | " + " | ".join(f"{r['ppl'][k]:.2f}" for k in names)
            + f" | {r['select_s']} | {r['forward_passes']} |"
            for r in rows
        ],
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
