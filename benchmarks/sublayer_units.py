"""What each sublayer of the default model costs to remove, and what sets of them cost at the byte
budget of 4 blocks: the measurements behind `--granularity sublayer`'s choice.

Everything runs through the product's own steps, as `build --granularity sublayer` runs them: the
default calibration (16 x 256 tokens the model generates itself), the chain of sublayer states
(`sublayers.capture_chain`), and the selection's own verifier (`sublayers.UnitRemovalScorer`):
calibration NLL with the units removed as shipped and their runs' maps in place, the maps fitted
on one half of the windows and scored on the other. These are calibration numbers, the quantity the
selection compares; held-out quality of what ships is in reports/sublayers.md and reports/frontier.md.

    python benchmarks/sublayer_units.py   # -> reports/sublayer_units.{md,json}; about 8 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mi_prun import sublayers
from mi_prun.calibration import calibration_batches
from mi_prun.jobs.loading import load_for_plan
from mi_prun.machine import Contention, contention_line, machine_line
from mi_prun.manifest import unit_name
from mi_prun.scoring import chain_scores
from mi_prun.plan import ExportPlan, Granularity, Plan, Target
from mi_prun.preflight import inspect
from mi_prun.progress import QUIET
from mi_prun.runner import Windows
from mi_prun.verify import window_means

ROOT = Path(__file__).resolve().parents[1]
REMOVE = 4  # blocks' worth of bytes, as reports/sublayers.md


def until(order: list[int], sizes: list[int], budget: int) -> list[int]:
    """Units taken in `order` until they hold `budget` bytes."""
    chosen: list[int] = []
    for u in order:
        if sum(sizes[c] for c in chosen) >= budget:
            break
        chosen.append(u)
    return sorted(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "sublayer_units")
    args = parser.parse_args()
    start, contention = time.perf_counter(), Contention()
    plan = Plan.make(remove=REMOVE, granularity=Granularity.sublayer, export=ExportPlan(target=Target.gguf))
    loaded = load_for_plan(inspect(plan.model), plan, QUIET)
    windows = Windows.share(calibration_batches(loaded, plan.calibration))
    chain = sublayers.capture_chain(loaded, windows)
    scorer = sublayers.UnitRemovalScorer(loaded, windows, chain, compensate=True)
    sizes = sublayers.unit_sizes(loaded)
    n = loaded.runner.n_blocks
    budget = REMOVE * sum(sizes) // n
    _, means = window_means([(windows.index, *loaded.runner.window_nll(windows.dense[n], windows.ids))])
    dense = float(means)

    units = []
    for u in range(2 * n):
        nll = scorer([u])
        units.append({"unit": unit_name(u), "bytes": sizes[u], "nll": round(nll, 4), "increase": round(nll - dense, 4),
                      "increase_per_mib": round((nll - dense) / (sizes[u] / 2**20), 4)})
        print(units[-1], flush=True)

    per_byte = sorted(range(2 * n), key=lambda u: units[u]["increase_per_mib"])
    selected, _ = sublayers.decide(loaded, plan, chain_scores(chain, plan), windows, chain)
    sets = {
        "what --granularity sublayer chooses (MI-PRUN, verified)": selected.removed,
        "the cheapest units alone per byte, until the budget": until(per_byte, sizes, budget),
        "feed-forward sublayers only, the cheapest alone per byte, until the budget": until([u for u in per_byte if u % 2], sizes, budget),
        "attention sublayers only, the cheapest alone, until the budget": until([u for u in per_byte if u % 2 == 0], sizes, budget),
    }
    rows = []
    for label, removed in sets.items():
        rows.append({"set": label, "removed": [unit_name(u) for u in removed], "bytes": sum(sizes[u] for u in removed),
                     "nll": round(scorer(removed), 4), "increase": round(scorer(removed) - dense, 4)})
        print(rows[-1], flush=True)
    payload = {"command": "python benchmarks/sublayer_units.py", "machine": machine_line("torch, 2 threads"),
               "contention": contention_line(contention.summary()), "wall_s": round(time.perf_counter() - start),
               "dense_nll": round(dense, 4), "budget_bytes": budget, "units": units, "sets": rows, "verification": scorer.describe()}
    args.report.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    args.report.with_suffix(".md").write_text(report(payload))
    print(report(payload))


def report(p: dict) -> str:
    lines = [
        "# What each sublayer costs to remove, default model (calibration NLL)",
        "",
        f"Command: `{p['command']}`. Machine: {p['machine']}. {p['contention']}. Wall time {p['wall_s']} s.",
        "",
        f"Every number is the selection's own verifier ({p['verification']}), on the default calibration (text the model "
        f"generates itself): mean NLL per token, nats. The model as given: {p['dense_nll']:.4f}. Calibration numbers, not "
        "held-out quality (that is in [sublayers.md](sublayers.md) and [frontier.md](frontier.md)).",
        "",
        f"## Sets at {REMOVE} blocks' worth of bytes ({p['budget_bytes'] / 2**20:.2f} MiB)",
        "",
        "| set | removed | MiB | NLL | increase |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['set']} | {', '.join(r['removed'])} | {r['bytes'] / 2**20:.2f} | {r['nll']:.4f} | {r['increase']:+.4f} |" for r in p["sets"]]
    lines += ["", "## Each unit removed alone", "", "| unit | KiB | NLL | increase | increase per MiB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {u['unit']} | {u['bytes'] / 1024:.0f} | {u['nll']:.4f} | {u['increase']:+.4f} | {u['increase_per_mib']:+.4f} |"
              for u in p["units"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
