"""Does a block score track real removal damage? Spearman rank correlation, every estimator and view.

Ground truth: calibration perplexity of the model with each block alone removed. A good
redundancy score ranks blocks in the same order (higher MI / lower 1 - cos = less damage).

    .venv/bin/python benchmarks/rank_correlation.py            # writes reports/rank_correlation.{md,json}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mi_prun import mi  # noqa: E402
from mi_prun.archs import input_norm_of_block  # noqa: E402
from mi_prun.calibration import calibration_batches  # noqa: E402
from mi_prun.capture import TokenSample, observe_cached  # noqa: E402
from mi_prun.load import load_model  # noqa: E402
from mi_prun.plan import CalibrationSpec  # noqa: E402
from mi_prun.progress import Reporter  # noqa: E402
from mi_prun.runner import Windows  # noqa: E402
from mi_prun.verify import RemovalScorer  # noqa: E402

WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"


def rms(a: np.ndarray) -> np.ndarray:
    return a / np.sqrt(np.mean(a * a, axis=1, keepdims=True) + 1e-6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--calib", default=str(WIKI_VALID))
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2040, help="token sample for the population estimators")
    parser.add_argument("--renyi-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "rank_correlation")
    args = parser.parse_args()
    torch.manual_seed(0)
    reporter = Reporter()
    started = time.perf_counter()

    loaded = load_model(args.model)
    n = loaded.runner.n_blocks
    calib = Windows(calibration_batches(loaded, CalibrationSpec(args.calib, args.n_samples, args.seq_len)))
    sample = TokenSample(args.tokens, seed=0)
    observe_cached(loaded.runner.dense_pass(calib), [sample], 4)
    raw = [s.astype(np.float64) for s in sample.arrays()]

    scorer = RemovalScorer(loaded, calib)  # plain removal, calibration NLL
    dense_nll = scorer([])
    with reporter.task("ground truth: perplexity with each block removed", n) as advance:
        damage = []
        for i in range(n):
            damage.append(float(np.exp(scorer([i]))))
            advance()

    norms = [input_norm_of_block(loaded.model, loaded.spec, b) for b in range(n + 1)]

    @torch.no_grad()
    def block_input(a: int, consumer: int) -> np.ndarray:
        """State at boundary a as the block consuming boundary `consumer` sees it after its input norm."""
        return norms[consumer](torch.from_numpy(raw[a]).float()).double().numpy()

    views = {"raw": raw, "rms": [rms(s) for s in raw]}
    n_renyi = args.renyi_tokens
    variants: dict[str, list[float]] = {}  # name -> redundancy per block (high = removable)
    with reporter.task("scoring variants", 6) as advance:
        for view, states in views.items():
            variants[f"token MI, {view}"] = [float(mi.token_gaussian_mi(states[i], states[i + 1]).mean()) for i in range(n)]
            variants[f"gaussian MI (pca 64), {view}"] = [mi.gaussian_mi(states[i], states[i + 1], pca_dim=64) for i in range(n)]
            advance()
            variants[f"renyi MI ({n_renyi} tokens), {view}"] = [
                mi.renyi_mi(states[i][:n_renyi], states[i + 1][:n_renyi]) for i in range(n)
            ]
            advance()
        variants["gaussian MI (pca 64), raw, no shrinkage"] = [mi.gaussian_mi(raw[i], raw[i + 1], shrinkage=0.0, pca_dim=64) for i in range(n)]
        pairs = [(block_input(i, i + 1), block_input(i + 1, i + 1)) for i in range(n)]
        variants["token MI, block-input view"] = [float(mi.token_gaussian_mi(x, y).mean()) for x, y in pairs]
        variants["gaussian MI (pca 64), block-input view"] = [mi.gaussian_mi(x, y, pca_dim=64) for x, y in pairs]
        advance()
        # MI gain toward the last boundary: how much closer block i brings the state to the output
        # redundancy = minus the gain: a block that moves the state toward the output matters
        variants["token MI gain to last boundary, raw"] = [
            -float(mi.token_gaussian_mi(raw[i + 1], raw[n]).mean() - mi.token_gaussian_mi(raw[i], raw[n]).mean())
            for i in range(n)
        ]
        variants["shortgpt cos (1 - BI), raw"] = [float(mi.cosine_similarity(raw[i], raw[i + 1]).mean()) for i in range(n)]
        variants["angular similarity (1 - d), raw"] = [float(1 - mi.angular_distance(raw[i], raw[i + 1]).mean()) for i in range(n)]
        advance()

    # Redundancy should anti-correlate with damage; report rho(damage, -redundancy) so higher is better.
    rows = []
    for name, redundancy in variants.items():
        rho = spearmanr(damage, -np.asarray(redundancy)).statistic
        rows.append({"variant": name, "spearman": round(float(rho), 3), "most_redundant": [int(i) for i in np.argsort(redundancy)[::-1][:4]]})
    rows.sort(key=lambda r: -r["spearman"])
    payload = {
        "command": "python benchmarks/rank_correlation.py " + " ".join(sys.argv[1:]),
        "model": loaded.source.describe(),
        "blocks": n,
        "calibration": {"source": args.calib, "n_samples": args.n_samples, "seq_len": args.seq_len, "population_tokens": args.tokens},
        "dense_calibration_ppl": round(float(np.exp(dense_nll)), 3),
        "single_removal_ppl": [round(d, 3) for d in damage],
        "least_damaging": [int(i) for i in np.argsort(damage)[:8]],
        "rows": rows,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# Rank correlation of block scores with real removal damage",
        "",
        f"Command: `{payload['command']}`  ",
        f"Model: {payload['model']} ({n} blocks). Calibration: {args.n_samples} x {args.seq_len} tokens of `{Path(args.calib).name}`; "
        f"first token of each sequence dropped; population estimators on {args.tokens} sampled tokens (Renyi: {n_renyi}).  ",
        f"Ground truth: calibration perplexity with each block alone removed (dense: {payload['dense_calibration_ppl']}); "
        f"least damaging blocks: {payload['least_damaging']}.  ",
        "Spearman rho between damage and minus the redundancy score (1.0 = perfect ranking). Wall time: "
        f"{payload['wall_s']} s.",
        "",
        "| variant | Spearman | 4 most redundant |",
        "|---|---|---|",
        *[f"| {r['variant']} | {r['spearman']:.3f} | {r['most_redundant']} |" for r in rows],
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
