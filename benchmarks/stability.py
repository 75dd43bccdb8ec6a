"""Stability of each method's choice: the removed blocks from three calibration sources and
three seeds, their pairwise Jaccard similarity, and the spread of held-out perplexity.

Every decision is `pipeline.prune` with `build`'s defaults but the calibration (what
`mi-prun-edge prune --remove N --method M --calib SOURCE --seed S` runs): 16 x 256 tokens of
self-generated text (seeds 0, 1, 2: each seed writes different text), of wiki.valid, and of the
licence texts Debian ships (GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3). A file's windows do not depend
on the seed, so the file sources count once each: five calibrations per method. Each decision is
evaluated as it ships from this process (its compensation maps folded in, torch fp32): the first
24 x 512 tokens of WikiText-2 test (held out from every calibration source).

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine_line  # noqa: E402
from mi_prun.load import load_model  # noqa: E402
from mi_prun.pipeline import prune  # noqa: E402
from mi_prun.plan import CalibrationSpec, EvalPlan, Method, Plan  # noqa: E402
from mi_prun.quality import measure_quality  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext2"
LICENCES = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3")]
METHODS = (Method.mi_prun, Method.shortgpt, Method.angular, Method.sleb, Method.ppl)


def jaccard(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=[m.value for m in METHODS])
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "stability")
    args = p.parse_args(argv)
    start, load_before = time.time(), list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="stability-") as tmp:
        licences = Path(tmp) / "licences.txt"
        licences.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in LICENCES), encoding="utf-8")
        sources = {"self, seed 0": ("self", 0), "self, seed 1": ("self", 1), "self, seed 2": ("self", 2),
                   "wiki.valid": (str(WIKI / "wiki.valid.tokens"), 0), "licence texts": (str(licences), 0)}
        loaded = load_model(None)
        evaluation = EvalPlan(data=str(WIKI / "wiki.test.raw"), windows=24)
        rows = []
        for method in args.methods:
            for name, (source, seed) in sources.items():
                plan = Plan.make(remove=args.n, method=Method(method), seed=seed, calibration=CalibrationSpec(source, 16, 256, seed))
                result = prune(loaded, plan)
                quality = measure_quality(loaded, result.removed, result.compensation, evaluation)
                rows.append({"method": method, "calibration": name, "removed": result.removed, "ppl": quality.pruned_ppl,
                             "dense_ppl": quality.dense_ppl, "select_s": round(sum(result.timings.values()), 1)})
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
        "Each cell is `pipeline.prune` with `build`'s defaults but the calibration source and `--seed` (16 x 256 tokens; "
        "compensation on, fitted on the same windows). Held-out perplexity: the decision with its maps, in torch fp32, on "
        f"the first 24 x 512 tokens of WikiText-2 test (dense {dense:.2f}). Jaccard: |A & B| / |A | B| over the 10 pairs "
        "of calibrations.", "",
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
