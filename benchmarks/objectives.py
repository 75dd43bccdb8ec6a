"""Which form of the MI-PRUN objective proposes the best removals, once they are compensated?

One capture pass (with the projection taps the compensated objective needs) on the calibration
windows; for each objective form and each N, Fast-Block-Select's optimum, compensated with maps
fitted on `--comp-samples` windows of the same source (as `prune --compensation-samples` fits them),
and evaluated held out: the first 24 x 512 tokens of WikiText-2 test and of the licence texts Debian
ships. No verification: this measures the proposals themselves, before MI-PRUN's verifier picks
one. The forms are `methods.objective_cost` (what `prune --objective` proposes); "compensated,
per-block" sums the single-block compensated costs (no run interaction), for comparison only.

    python benchmarks/objectives.py          # -> reports/objectives.{md,json}; about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality as q  # noqa: E402
from machine import machine_line  # noqa: E402
from plans import source_name  # noqa: E402
from mi_prun import select  # noqa: E402
from mi_prun.calibration import CalibrationSpec, calibration_batches  # noqa: E402
from mi_prun.compensate import compensation_for  # noqa: E402
from mi_prun.methods import objective_cost  # noqa: E402
from mi_prun.plan import Objective, Plan  # noqa: E402
from mi_prun.progress import QUIET  # noqa: E402
from mi_prun.runner import Windows  # noqa: E402
from mi_prun.scoring import score_model  # noqa: E402
from mi_prun.verify import ensure_dense  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--calib", default=str(q.WIKI / "wiki.valid.tokens"))
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--comp-samples", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "objectives")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    start, load_before = time.time(), list(os.getloadavg())
    bench = q.open_bench(q.parse_args([]), QUIET)
    loaded = bench.loaded
    n_blocks = loaded.runner.n_blocks
    spec = CalibrationSpec(args.calib, args.calib_samples, 256)
    calib = Windows(calibration_batches(loaded, spec))
    scores = score_model(loaded, calib, Plan.make(remove=args.n[0], calibration=spec), taps=True)
    fit = ensure_dense(loaded.runner, Windows(calibration_batches(loaded, spec.model_copy(update={"n_samples": args.comp_samples}))))
    forms = {o.value: objective_cost(o, scores) for o in Objective}
    forms["compensated, per-block"] = select.additive_over_blocks([scores.recovery.run_cost(i, i) for i in range(n_blocks)])
    measured: dict[tuple[int, ...], dict] = {}
    rows = []
    for n in args.n:
        for form, cost in forms.items():
            removed, _ = select.fast_block_select(n_blocks, n, [cost(i, i) for i in range(n_blocks)], cost)
            key = tuple(removed)
            if key not in measured:
                runs = compensation_for(loaded, removed, fit)
                measured[key] = {which: bench.evaluate(which, removed, runs, False).ppl for which in ("eval", "heldout")}
            rows.append({"n": n, "form": form, "removed": removed, **measured[key]})
            print(json.dumps(rows[-1]), flush=True)
    payload = {
        "command": "python benchmarks/objectives.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_line("2 torch threads"), "calibration": f"{args.calib_samples} x 256 tokens of {source_name(args.calib)}",
        "compensation": f"{args.comp_samples} x 256 tokens of the same file", "rows": rows,
        "loadavg_before_after": [load_before, list(os.getloadavg())], "wall_s": round(time.time() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# MI-PRUN's objective forms: their proposals, compensated, on held-out text", "",
        f"Command: `{payload['command']}`. {payload['machine']}. Wall time {payload['wall_s']} s; load average before "
        f"{load_before}, after {payload['loadavg_before_after'][1]}. Model: the embedded SmolLM2-135M (30 blocks).", "",
        f"Selection: one capture of {payload['calibration']}; each form's Fast-Block-Select optimum (no verification). "
        f"Compensation: maps fitted on {payload['compensation']}. Perplexity of the compensated model (torch, fp32) on "
        "the first 24 x 512 tokens of WikiText-2 test and of the licence texts (GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3).", "",
        "| N | form | removed | wikitext-2 test | licence texts |", "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n']} | {r['form']} | {r['removed']} | {r['eval']:.2f} | {r['heldout']:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
