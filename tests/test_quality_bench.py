"""The method comparison benchmark, small: one N, tiny model, tiny evaluation; every method reported."""

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import WIKI_TEST

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402


def test_quality_benchmark_small(tiny_models, calib_txt, tmp_path):
    eval_txt = tmp_path / "eval.txt"
    eval_txt.write_text(WIKI_TEST.read_text(encoding="utf-8")[:20000])
    out, cache = tmp_path / "report" / "quality", tmp_path / "cache.json"
    argv = ["--model", str(tiny_models["llama"]), "--n", "2", "--calib", str(calib_txt), "--calib-samples", "4",
            "--calib-len", "64", "--eval-calib-samples", "2", "--eval-data", str(eval_txt), "--eval-windows", "3",
            "--eval-len", "64", "--estimators", "gaussian", "--comp-samples", "6", "--heldout", str(eval_txt),
            "--out", str(out), "--cache", str(cache)]
    quality.main(argv)
    payload = json.loads(out.with_suffix(".json").read_text())
    methods = {r["method"] for r in payload["rows"]}
    assert methods == {quality.DEFAULT_LABEL, "dense", "mi-prun", "mi-prun-exact", "mi-prun --no-compensate", "mi-prun-exact --no-compensate",
                       "shortgpt", "angular", "sleb", "ppl", "random-0", "random-1", "random-2", "mi-prun[gaussian]"}
    dense = next(r for r in payload["rows"] if r["method"] == "dense")
    assert dense["kl"] == pytest.approx(0, abs=1e-6) and dense["top1"] == 1.0
    for r in payload["rows"]:
        if r["method"] != "dense":
            assert len(r["removed"]) == 2 and r["kl"] > 0 and r["forward_passes"] >= 1
    # the compensated rows: main methods only, each with its fitted runs and the held-out text
    compensated = {r["method"] for r in payload["rows"] if "compensated" in r}
    assert compensated == set(quality.COMPENSATED) | {quality.DEFAULT_LABEL}
    for r in payload["rows"]:
        if "compensated" in r:
            c = r["compensated"]
            assert c["ppl"] > 0 and c["ppl_heldout"] > 0 and len(c["runs"]) >= 1
    # plain removal of the same methods is measured on the held-out text too
    assert all(r["ppl_heldout"] > 0 for r in payload["rows"] if r["method"] in quality.COMPENSATED)
    sleb = next(r for r in payload["rows"] if r["method"] == "sleb")
    assert sleb["forward_passes"] == 1 + 8 + 7  # prune's capture pass, then two greedy steps over 8 blocks
    md = out.with_suffix(".md").read_text()
    assert "| mi-prun |" in md and "Fast-Block-Select" in md and "scored tokens" in md and "| mi-prun | 2 | channel |" in md
    assert "with linear compensation" in md and "other held-out text" in md and "| shortgpt, plain removal |" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # A rerun reads every selection and evaluation from the cache: same rows.
    quality.main(argv)
    again = json.loads(out.with_suffix(".json").read_text())
    assert [(r["method"], r["removed"], r["ppl"]) for r in again["rows"]] == [(r["method"], r["removed"], r["ppl"]) for r in payload["rows"]]
