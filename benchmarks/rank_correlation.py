"""Does a block score track real removal damage? Spearman rank correlation, every estimator and view.

Ground truth: calibration perplexity of the model with each block alone removed. A good
redundancy score ranks blocks in the same order (higher MI / lower 1 - cos = less damage).

This benchmark compares the estimators themselves (Gaussian, token, Renyi MI, cosine, angular, in
several state views) on one shared token sample of the same calibration windows, and scores each
single-block removal: no command exposes those, so it runs the product's own estimator, capture and
removal-scoring functions (`mi_prun.mi`, `capture`, `verify`) directly.

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

from mi_prun import mi
from mi_prun.archs import input_norm_of_block
from mi_prun.calibration import calibration_batches
from mi_prun.capture import TokenSample, observe_cached
from mi_prun.load import load_model
from mi_prun.plan import CalibrationSpec
from mi_prun.progress import Reporter
from mi_prun.runner import Windows
from mi_prun.verify import RemovalScorer

ROOT = Path(__file__).resolve().parents[1]
WIKI_VALID = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"


def rms(a: np.ndarray) -> np.ndarray:
    return a / np.sqrt(np.mean(a * a, axis=1, keepdims=True) + 1e-6)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--calib", default=str(WIKI_VALID))
    parser.add_argument("--n-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2040, help="token sample for the population estimators")
    parser.add_argument("--renyi-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "rank_correlation")
    return parser.parse_args(argv)


def boundary_states(loaded, calib: Windows, tokens: int) -> list[np.ndarray]:
    """The states at every block boundary of one token sample of the calibration windows (float64)."""
    sample = TokenSample(tokens, seed=0)
    observe_cached(loaded.runner.dense_pass(calib), [sample], 4)
    return [s.astype(np.float64) for s in sample.arrays()]


def ground_truth(loaded, calib: Windows, reporter) -> tuple[float, list[float]]:
    """Dense calibration NLL, and the calibration perplexity with each block alone removed (plain removal)."""
    scorer = RemovalScorer(loaded, calib)
    dense_nll = scorer([])
    n = loaded.runner.n_blocks
    with reporter.task("ground truth: perplexity with each block removed", n) as advance:
        damage = []
        for i in range(n):
            damage.append(float(np.exp(scorer([i]))))
            advance()
    return dense_nll, damage


def view_variants(views: dict[str, list[np.ndarray]], n: int, n_renyi: int, advance) -> dict[str, list[float]]:
    """Token, Gaussian and Renyi MI between neighbouring boundaries, in each view of the states."""
    variants = {}
    for view, states in views.items():
        variants[f"token MI, {view}"] = [float(mi.token_gaussian_mi(states[i], states[i + 1]).mean()) for i in range(n)]
        variants[f"gaussian MI (pca 64), {view}"] = [mi.gaussian_mi(states[i], states[i + 1], pca_dim=64) for i in range(n)]
        advance()
        variants[f"renyi MI ({n_renyi} tokens), {view}"] = [
            mi.renyi_mi(states[i][:n_renyi], states[i + 1][:n_renyi]) for i in range(n)
        ]
        advance()
    return variants


def block_input_variants(loaded, raw: list[np.ndarray], n: int) -> dict[str, list[float]]:
    """Token and Gaussian MI with both states as the consuming block sees them, after its input norm."""
    norms = [input_norm_of_block(loaded.model, loaded.spec, b) for b in range(n + 1)]

    @torch.no_grad()
    def block_input(a: int, consumer: int) -> np.ndarray:
        """State at boundary a as the block consuming boundary `consumer` sees it after its input norm."""
        return norms[consumer](torch.from_numpy(raw[a]).float()).double().numpy()

    pairs = [(block_input(i, i + 1), block_input(i + 1, i + 1)) for i in range(n)]
    return {
        "token MI, block-input view": [float(mi.token_gaussian_mi(x, y).mean()) for x, y in pairs],
        "gaussian MI (pca 64), block-input view": [mi.gaussian_mi(x, y, pca_dim=64) for x, y in pairs],
    }


def raw_variants(raw: list[np.ndarray], n: int) -> dict[str, list[float]]:
    """The gain toward the last boundary, and the ShortGPT and angular similarities, on the raw states."""
    # MI gain toward the last boundary: how much closer block i brings the state to the output
    # redundancy = minus the gain: a block that moves the state toward the output matters
    return {
        "token MI gain to last boundary, raw": [
            -float(mi.token_gaussian_mi(raw[i + 1], raw[n]).mean() - mi.token_gaussian_mi(raw[i], raw[n]).mean())
            for i in range(n)
        ],
        "shortgpt cos (1 - BI), raw": [float(mi.cosine_similarity(raw[i], raw[i + 1]).mean()) for i in range(n)],
        "angular similarity (1 - d), raw": [float(1 - mi.angular_distance(raw[i], raw[i + 1]).mean()) for i in range(n)],
    }


def score_variants(loaded, raw: list[np.ndarray], n_renyi: int, reporter) -> dict[str, list[float]]:
    """Every estimator and view: name -> redundancy per block (high = removable)."""
    n = loaded.runner.n_blocks
    views = {"raw": raw, "rms": [rms(s) for s in raw]}
    with reporter.task("scoring variants", 6) as advance:
        variants = view_variants(views, n, n_renyi, advance)
        variants["gaussian MI (pca 64), raw, no shrinkage"] = [mi.gaussian_mi(raw[i], raw[i + 1], shrinkage=0.0, pca_dim=64) for i in range(n)]
        variants |= block_input_variants(loaded, raw, n)
        advance()
        variants |= raw_variants(raw, n)
        advance()
    return variants


def correlation_rows(damage: list[float], variants: dict[str, list[float]]) -> list[dict]:
    """Spearman rho per variant, best first."""
    # Redundancy should anti-correlate with damage; report rho(damage, -redundancy) so higher is better.
    rows = []
    for name, redundancy in variants.items():
        rho = spearmanr(damage, -np.asarray(redundancy)).statistic
        rows.append({"variant": name, "spearman": round(float(rho), 3), "most_redundant": [int(i) for i in np.argsort(redundancy)[::-1][:4]]})
    rows.sort(key=lambda r: -r["spearman"])
    return rows


def report_lines(payload: dict, args: argparse.Namespace) -> list[str]:
    rows = payload["rows"]
    return [
        "# Rank correlation of block scores with real removal damage",
        "",
        f"Command: `{payload['command']}`  ",
        f"Model: {payload['model']} ({payload['blocks']} blocks). Calibration: {args.n_samples} x {args.seq_len} tokens of `{Path(args.calib).name}`; "
        f"first token of each sequence dropped; population estimators on {args.tokens} sampled tokens (Renyi: {args.renyi_tokens}).  ",
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


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    reporter = Reporter()
    started = time.perf_counter()

    loaded = load_model(args.model)
    calib = Windows(calibration_batches(loaded, CalibrationSpec(args.calib, args.n_samples, args.seq_len)))
    raw = boundary_states(loaded, calib, args.tokens)
    dense_nll, damage = ground_truth(loaded, calib, reporter)
    variants = score_variants(loaded, raw, args.renyi_tokens, reporter)
    rows = correlation_rows(damage, variants)
    payload = {
        "command": "python benchmarks/rank_correlation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": loaded.source.describe(),
        "blocks": loaded.runner.n_blocks,
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
    lines = report_lines(payload, args)
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
