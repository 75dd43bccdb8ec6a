"""Stability of each method's choice: the removed blocks from three calibration sources and
three seeds, their pairwise Jaccard similarity, and the spread of held-out perplexity.

Every decision is `jobs.prune` (what `mi-prun-edge prune --remove N --method M --calib SOURCE
--seed S` runs) with `build`'s defaults but the calibration: 16 x 256 tokens of self-generated text
(seeds 0, 1, 2: each seed writes different text), of wiki.valid, and of the licence texts Debian
ships (GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3). A file's windows do not depend on the seed, so the
file sources count once each: five calibrations per method. Each decision is evaluated as it ships
(the checkpoint `prune` wrote, compensation maps folded in, measured by `jobs.evaluate` in torch
fp32, as `mi-prun-edge eval` does): the first 24 x 512 tokens of WikiText-2 test (held out from
every calibration source).

    python benchmarks/stability.py --n 4     # -> reports/stability.{md,json}; about 45 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mi_prun import jobs
from mi_prun.machine import machine_line
from mi_prun.plan import CalibrationSpec, EvalRunPlan, Method, Plan

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext2"
LICENCES = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3")]
METHODS = (Method.mi_prun, Method.shortgpt, Method.angular, Method.sleb, Method.ppl)
# Held-out perplexity: the first 24 x 512 tokens of WikiText-2 test.
HELD_OUT = WIKI / "wiki.test.raw"
HELD_OUT_WINDOWS, HELD_OUT_SEQ_LEN = 24, 512


def jaccard(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def held_out_ppl(model: str | None) -> float:
    """Perplexity of a model (None: the dense default) on the held-out windows, as `mi-prun-edge eval` measures it."""
    plan = EvalRunPlan(data=str(HELD_OUT), model=model, seq_len=HELD_OUT_SEQ_LEN, max_windows=HELD_OUT_WINDOWS)
    return jobs.evaluate(plan).measured.ppl


def decision(plan: Plan, out: Path) -> dict:
    """The blocks `plan` removes, the held-out perplexity of the checkpoint it writes into `out`, and
    the seconds its stages took before the checkpoint was written."""
    manifest = jobs.prune(plan, out, force=True).manifest
    seconds = sum(v for stage, v in manifest.timings_s.items() if stage != "repack")
    return {"removed": manifest.removed, "ppl": held_out_ppl(str(out)), "select_s": round(seconds, 1)}


def calibrations(tmp: Path) -> dict[str, tuple[str, int]]:
    """Calibration name -> (source, seed); the licence texts are joined into one file under `tmp`."""
    licences = tmp / "licences.txt"
    licences.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in LICENCES), encoding="utf-8")
    return {"self, seed 0": ("self", 0), "self, seed 1": ("self", 1), "self, seed 2": ("self", 2),
            "wiki.valid": (str(WIKI / "wiki.valid.tokens"), 0), "licence texts": (str(licences), 0)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=[m.value for m in METHODS])
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "stability")
    args = p.parse_args(argv)
    start, load_before = time.time(), list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="stability-") as tmp:
        sources = calibrations(Path(tmp))
        dense_ppl = held_out_ppl(None)
        rows = []
        for method in args.methods:
            for name, (source, seed) in sources.items():
                plan = Plan.make(remove=args.n, method=Method(method), seed=seed, calibration=CalibrationSpec(source, 16, 256, seed))
                made = decision(plan, Path(tmp) / "pruned")  # one folder, replaced by each decision
                rows.append({"method": method, "calibration": name, "removed": made["removed"], "ppl": made["ppl"],
                             "dense_ppl": dense_ppl, "select_s": made["select_s"]})
                print(json.dumps(rows[-1]), flush=True)
    payload = {
        "command": "python benchmarks/stability.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_line("2 torch threads"), "n": args.n, "rows": rows,
        "loadavg_before_after": [load_before, list(os.getloadavg())], "wall_s": round(time.time() - start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(report(payload) + "\n")
    print(report(payload))


def report(payload: dict) -> str:
    rows = payload["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    sources = list(dict.fromkeys(r["calibration"] for r in rows))
    dense = rows[0]["dense_ppl"] if rows else float("nan")
    lines = [
        f"# Stability of the removed blocks (N = {payload['n']})", "",
        f"Command: `{payload['command']}`. {payload['machine']}. Wall time {payload['wall_s']} s; load average before "
        f"{payload['loadavg_before_after'][0]}, after {payload['loadavg_before_after'][1]}.", "",
        "Each cell is `mi-prun-edge prune` (`jobs.prune`) with `build`'s defaults but the calibration source and `--seed` "
        "(16 x 256 tokens; compensation on, fitted on the same windows). Held-out perplexity: the checkpoint it wrote, its maps "
        f"folded in, measured as `mi-prun-edge eval` does (torch fp32) on the first 24 x 512 tokens of WikiText-2 test (dense "
        f"{dense:.2f}). Jaccard: |A & B| / |A | B| over the 10 pairs of calibrations.", "",
        "| method | " + " | ".join(sources) + " | mean Jaccard | min Jaccard | held-out ppl, min-max |",
        "|---|" + "---|" * (len(sources) + 3),
    ]
    summary = {}
    for method in methods:
        mine = {r["calibration"]: r for r in rows if r["method"] == method}
        pairs = [jaccard(mine[a]["removed"], mine[b]["removed"]) for a, b in itertools.combinations(mine, 2)]
        ppl = [r["ppl"] for r in mine.values()]
        summary[method] = statistics.mean(pairs) if pairs else float("nan")
        cells = " | ".join(f"{mine[s]['removed']} {mine[s]['ppl']:.2f}" if s in mine else "" for s in sources)
        lines.append(f"| {method} | {cells} | {summary[method]:.3f} | {min(pairs) if pairs else float('nan'):.3f} | "
                     f"{min(ppl):.2f}-{max(ppl):.2f} |")
    if "mi-prun" in summary:
        less = [m for m, v in summary.items() if m != "mi-prun" and v > summary["mi-prun"]]
        lines += ["", "MI-PRUN (the default) is at least as stable as every baseline (mean Jaccard)." if not less else
                  f"MI-PRUN (the default) is less stable than {', '.join(less)} (mean Jaccard)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
