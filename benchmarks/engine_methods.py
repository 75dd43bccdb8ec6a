"""Perplexity after pruning, every selection method, on the default model (engine acceptance run).

Calibration: `wiki.valid.tokens` windows. Evaluation: the first 24 windows of 512 tokens of
`wiki.test.raw` (as in the engine issue's table), and the same size of a second, non-wiki text
(the GPL-3, Apache-2.0, MPL-2.0 and GFDL-1.3 licence texts shipped by Debian) to check that the
ordering holds off WikiText.

Each row is one `pipeline.prune` run, what `mi-prun-edge prune` runs with the row's flags: plain
removal (`--no-compensate`, the engine issue's setting) unless `--compensate` is given.

    .venv/bin/python benchmarks/engine_methods.py --n 4 8     # writes reports/engine_methods.{md,json}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from mi_prun.calibration import tokenize_text  # noqa: E402
from mi_prun.compensate import capture_passes, removal_runs  # noqa: E402
from mi_prun.evaluate import eval_windows, perplexity  # noqa: E402
from mi_prun.load import load_model  # noqa: E402
from mi_prun.pipeline import prune  # noqa: E402
from mi_prun.plan import CalibrationSpec, Method, Plan  # noqa: E402
from mi_prun.progress import Reporter  # noqa: E402
from plans import plan_flags  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext2"
LICENCES = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3")]
EVALUATING = (Method.sleb, Method.ppl)  # a forward pass per candidate: fewer calibration windows


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--methods", nargs="+", default=[m.value for m in Method])
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-calib-samples", type=int, default=4, help="calibration windows for sleb/ppl (each candidate costs a pass)")
    parser.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=False,
                        help="prune as shipped (compensated); default: plain removal, as in the engine issue")
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "engine_methods")
    return parser.parse_args()


def method_plan(args, method: Method, n: int) -> Plan:
    windows = args.eval_calib_samples if method in EVALUATING else args.calib_samples
    return Plan.make(model=args.model, method=method, remove=n, compensate=args.compensate,
                     calibration=CalibrationSpec(str(WIKI / "wiki.valid.tokens"), windows, 256))


def held_out(loaded, eval_windows_count: int) -> dict[str, torch.Tensor]:
    texts = {"wikitext2-test": (WIKI / "wiki.test.raw").read_text(encoding="utf-8")}
    if all(p.is_file() for p in LICENCES):
        texts["licences"] = "\n\n".join(p.read_text(encoding="utf-8") for p in LICENCES)
    return {k: eval_windows(tokenize_text(loaded.tokenizer, t), 512, eval_windows_count) for k, t in texts.items()}


def perplexities(loaded, kept, runs, evals: dict[str, torch.Tensor]) -> dict[str, float]:
    """Held-out perplexity of a decision: the kept blocks, the fitted maps (if any) folded in."""
    removed = [i for i in range(loaded.runner.n_blocks) if i not in set(kept)]
    return {k: round(perplexity(loaded.runner, w, removal_runs(removed, runs)).ppl, 2) for k, w in evals.items()}


def method_row(loaded, plan: Plan, evals, reporter) -> dict:
    result = prune(loaded, plan, reporter)
    t = result.timings
    row = {
        "method": plan.method.value, "n": plan.remove, "flags": plan_flags(plan), "removed": result.removed,
        "select_s": round(t.get("calibrate", 0.0) + t.get("capture", 0.0) + t.get("select", 0.0), 1),
        "forward_passes": result.selection.forward_passes - capture_passes(result.compensation),
        "calib_windows": plan.calibration.n_samples,
    }
    if result.selection.candidates:
        row["candidates"] = [c.model_dump() for c in result.selection.candidates]
    if result.compensation:
        row["fit_s"] = round(t.get("compensate", 0.0), 1)
    row["ppl"] = perplexities(loaded, result.kept, result.compensation, evals)
    return row


def main() -> None:
    args = parse_args()
    reporter = Reporter()
    started = time.perf_counter()

    loaded = load_model(args.model)
    evals = held_out(loaded, args.eval_windows)
    dense = list(range(loaded.runner.n_blocks))
    rows = [{"method": "dense", "n": 0, "flags": "", "removed": [], "ppl": perplexities(loaded, dense, [], evals),
             "select_s": 0.0, "forward_passes": 0}]
    for n in args.n:
        for name in args.methods:
            rows.append(method_row(loaded, method_plan(args, Method(name), n), evals, reporter))
            reporter.say(json.dumps(rows[-1]))

    payload = {
        "command": "python benchmarks/engine_methods.py " + " ".join(sys.argv[1:]),
        "model": loaded.source.describe(),
        "eval": {k: f"first {w.shape[0]} windows x 512 tokens ({w.shape[0] * 511} predicted)" for k, w in evals.items()},
        "calibration": f"{args.calib_samples} x 256 tokens of wiki.valid.tokens (sleb, ppl: {args.eval_calib_samples} windows of it); "
                       + ("compensated as shipped" if args.compensate else "plain removal (--no-compensate)"),
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
        "Each row: `mi-prun-edge prune` with its flags (pipeline.prune). Select s: its calibrate + capture + select stages; "
        "forward passes: the capture pass plus the scoring passes of the methods that evaluate.",
        "",
        "| method | N | flags | removed | " + " | ".join(f"ppl {k}" for k in names) + " | select s | forward passes |",
        "|---|---|---|---|" + "---|" * len(names) + "---|---|",
        *[
            f"| {r['method']} | {r['n']} | {r['flags']} | {r['removed']} | " + " | ".join(f"{r['ppl'][k]:.2f}" for k in names)
            + f" | {r['select_s']} | {r['forward_passes']} |"
            for r in rows
        ],
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
