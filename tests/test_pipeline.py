"""End-to-end on tiny random models of every supported architecture: capture, select, repack, reload."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mi_prun import mi, select
from mi_prun.archs import blocks
from mi_prun.calibration import CalibrationSpec
from mi_prun.blockset import blocks_kept
from mi_prun.compensate import applied
from mi_prun.select import runs_of
from mi_prun.capture import TokenSample, observe_cached
from mi_prun.load import load_model
from mi_prun.manifest import PruningManifest
from mi_prun.pipeline import prune, save_pruned
from mi_prun.plan import Estimator, Method, Plan, StateView
from mi_prun.runner import Windows

from .conftest import TINY_BLOCKS, TINY_CONFIGS


def options(calib, **kw):
    base = dict(remove=3, calibration=CalibrationSpec(str(calib), n_samples=4, seq_len=64), batch_size=2)
    base.update(kw)
    return Plan(**base)


def test_capture_matches_hidden_states(tiny_models):
    loaded = load_model(str(tiny_models["llama"]))
    ids = torch.randint(0, 384, (2, 20))
    sample = TokenSample(max_tokens=1000)
    windows = loaded.runner.dense_pass(Windows(ids))
    seen = observe_cached(windows, [sample], batch_size=1)
    assert seen == 2 * 19  # the first (sink) token of every sequence is dropped
    with torch.no_grad():
        hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    states = sample.arrays()
    assert len(states) == TINY_BLOCKS + 1
    # hidden_states[b] is the input of block b; the last entry is after the final norm, so skip it
    for b in range(TINY_BLOCKS):
        np.testing.assert_allclose(states[b], hidden[b][:, 1:].reshape(-1, 64).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(states[-1], hidden[-1][:, 1:].reshape(-1, 64).numpy(), atol=1e-3)


def model_boundaries(loaded, ids) -> list[torch.Tensor]:
    """Every block boundary from the model's forward: hidden_states up to the last block's input,
    then the last block's output (hidden_states ends after the final norm)."""
    last = {}
    hook = blocks(loaded.model, loaded.spec)[-1].register_forward_hook(lambda _m, _i, out: last.setdefault("h", out))
    try:
        with torch.no_grad():
            hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    out = last["h"][0] if isinstance(last["h"], tuple) else last["h"]
    return list(hidden[:-1]) + [out]


def test_token_sample_is_bounded_and_seeded():
    def run(seed):
        sample = TokenSample(max_tokens=50, seed=seed)
        for start in range(0, 400, 40):
            sample.observe([torch.arange(start, start + 40, dtype=torch.float32)[:, None].repeat(1, 3)])
        return sample.arrays()[0][:, 0]

    a = run(0)
    assert a.shape == (50,) and len(set(a.tolist())) == 50
    assert np.array_equal(a, run(0))
    assert not np.array_equal(a, run(1))
    assert a.max() >= 50  # later tokens do get in


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_prune_repack_reload_parity(model_type, tiny_models, calib_txt, tmp_path):
    loaded = load_model(str(tiny_models[model_type]))
    opts = options(calib_txt)
    result = prune(loaded, opts)
    assert len(result.removed) == 3 and len(result.kept) == TINY_BLOCKS - 3
    out = tmp_path / "pruned"
    manifest = save_pruned(loaded, opts, result, out)

    # Repacking leaves the loaded model as it was; the same decision applied in memory is the reference.
    assert len(blocks(loaded.model, loaded.spec)) == TINY_BLOCKS
    ids = result.calibration_ids[:2, :48]
    prompt = ids[:1, :10]
    with torch.no_grad(), applied(loaded.model, loaded.spec, result.compensation), blocks_kept(loaded.model, loaded.spec, result.kept):
        expected = loaded.model(input_ids=ids).logits
        b = loaded.model.generate(prompt, max_new_tokens=8, do_sample=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == TINY_BLOCKS - 3
    if "layer_types" in TINY_CONFIGS[model_type]:
        original = TINY_CONFIGS[model_type]["layer_types"]
        assert config["layer_types"] == [original[i] for i in manifest.kept]
    for new_index, block in enumerate(blocks(reloaded, loaded.spec)):
        assert block.self_attn.layer_idx == new_index
    # KV-cached generation works and matches the in-memory pruned model
    a = reloaded.generate(prompt, max_new_tokens=8, do_sample=False)
    assert a.shape == (1, 18) and torch.equal(a, b)


@pytest.mark.parametrize("method", [m for m in Method])
def test_every_method_selects_and_records(method, tiny_models, calib_txt, tmp_path):
    loaded = load_model(str(tiny_models["qwen3"]))
    opts = options(calib_txt, method=method, remove=2)
    result = prune(loaded, opts)
    assert len(result.removed) == 2 and len(set(result.removed)) == 2
    manifest = save_pruned(loaded, opts, result, tmp_path / "out")
    again = PruningManifest.read(tmp_path / "out")
    assert again == manifest
    assert again.method == method.value and again.removed == result.removed
    assert again.kept == [i for i in range(TINY_BLOCKS) if i not in result.removed]
    assert len(again.block_scores["mi"]) == TINY_BLOCKS
    assert len(again.run_scores) == TINY_BLOCKS * (TINY_BLOCKS + 1) // 2
    costs = again.block_scores["cost"]
    assert all(r.dpi_bound == max(costs[r.start : r.end + 1]) for r in again.run_scores)
    assert set(again.timings_s) >= {"calibrate", "capture", "select", "repack"}
    assert again.plan == opts  # recorded verbatim: what --plan replays
    assert again.calibration.tokens_observed == 4 * 63
    # Compensation: one map per removed run (none for a run at block 0), one capture pass each.
    comp = again.compensation
    assert comp.enabled and [(r.first, r.last) for r in comp.runs] == runs_of(result.removed)
    assert all((r.folded_into is None) == (r.first == 0) for r in comp.runs)
    assert all(r.fit_error_ratio <= 1.0 + 1e-9 for r in comp.runs if r.folded_into is not None)
    fit_passes = lambda removed: sum(first > 0 for first, _ in runs_of(removed))  # noqa: E731
    if method is Method.sleb:
        assert again.selection.forward_passes == 1 + TINY_BLOCKS + (TINY_BLOCKS - 1) + fit_passes(result.removed)
        assert again.selection.verified == TINY_BLOCKS + (TINY_BLOCKS - 1)  # every removal it scored is distinct
    if method is Method.ppl:
        assert again.selection.forward_passes == 1 + TINY_BLOCKS + fit_passes(result.removed)
        assert again.selection.verified == TINY_BLOCKS
    if method in (Method.mi_prun, Method.mi_prun_exact):
        candidates = again.selection.candidates
        assert [c.objective for c in candidates] == ["channel", "per-block", "length-penalized"]
        # Each proposal's recorded optimum is the brute-force optimum of its objective, rebuilt
        # from the run costs the manifest records.
        run_cost = {(r.start, r.end): r.cost for r in again.run_scores}
        block_cost = again.block_scores["cost"]
        objectives = {
            "channel": lambda a, b: run_cost[(a, b)],
            "per-block": lambda a, b: sum(block_cost[a : b + 1]),
            "length-penalized": lambda a, b: run_cost[(a, b)] * (b - a + 1),
        }
        for c in candidates:
            cost = objectives[c.objective]
            brute = min(select.selection_cost(combo, cost) for combo in itertools.combinations(range(TINY_BLOCKS), 2))
            assert c.exact_cost == pytest.approx(brute, rel=1e-9)
            assert c.objective_cost == pytest.approx(select.selection_cost(c.removed, cost), rel=1e-9)
        distinct = {tuple(c.removed) for c in candidates}
        verified = len(distinct) > 1
        assert (again.selection.verification is not None) == verified
        # one scoring per distinct proposal (plus one capture pass per compensated run), and the
        # final maps fitted again on every calibration window: one more pass per run
        scoring = sum(1 + fit_passes(d) for d in distinct) if verified else 0
        assert again.selection.forward_passes == 1 + scoring + fit_passes(result.removed)
        if verified:
            assert_verified_choice(candidates, again.removed)


def assert_verified_choice(candidates, removed) -> None:
    """What verification recorded explains its choice: each proposal's per-window NLLs average to
    its calibration NLL (equal windows); taken in order, each proposal different from the one kept so
    far records the paired one-sided t-test against it, and displaces it when p < 0.025."""
    from scipy import stats

    kept = candidates[0]
    assert kept.lower_p is None
    for c in candidates:
        assert np.mean(c.window_nll) == pytest.approx(c.calibration_nll, abs=1e-4)
    for c in candidates[1:]:
        if sorted(c.removed) == sorted(kept.removed):
            assert c.lower_p is None
            continue
        assert c.lower_p == pytest.approx(stats.ttest_rel(c.window_nll, kept.window_nll, alternative="less").pvalue, abs=1e-3)
        if c.lower_p < 0.025:
            kept = c
    assert removed == kept.removed


@pytest.mark.parametrize("estimator", [e for e in Estimator])
@pytest.mark.parametrize("view", [v for v in StateView])
def test_estimators_and_views(estimator, view, tiny_models, calib_txt):
    """Block MI equals the mi.py estimator applied to independently captured states."""
    loaded = load_model(str(tiny_models["llama"]))
    plan = options(calib_txt, estimator=estimator, view=view, max_tokens=96)
    result = prune(loaded, plan)
    table = result.scores.block_table()
    sample = TokenSample(max_tokens=96 if estimator is not Estimator.token else 10**6, seed=plan.seed)
    for ids in result.calibration_ids.split(plan.batch_size):  # the model's own forward, not the runner
        sample.observe([s[:, 1:].reshape(-1, s.shape[-1]).float() for s in model_boundaries(loaded, ids)])
    states = [s.astype(np.float64) for s in sample.arrays()]
    if view is StateView.rms:
        states = [s / np.sqrt((s * s).mean(-1, keepdims=True) + 1e-6) for s in states]
    for i in (0, 3, TINY_BLOCKS - 1):
        x, y = states[i], states[i + 1]
        if estimator is Estimator.token:
            expected, dims = mi.token_gaussian_mi(x, y).mean(), 1
        elif estimator is Estimator.gaussian:
            expected, dims = mi.gaussian_mi(x, y, shrinkage=0.05, pca_dim=64), 64
        else:
            expected, dims = mi.renyi_mi(x, y, alpha=1.01) * np.log(2.0), 1
        assert table["mi"][i] == pytest.approx(expected, rel=1e-4)
        assert table["cost"][i] == pytest.approx(np.exp(-2 * expected / dims), rel=1e-4)


def test_same_seed_same_scores_another_seed_other_scores(tiny_models, calib_txt):
    """The token subsample is seeded: the same seed gives the very same scores and choice, another
    seed other scores (a constant or unseeded estimator fails one of the two)."""
    def run(seed):
        loaded = load_model(str(tiny_models["mistral"]))
        return prune(loaded, options(calib_txt, estimator=Estimator.gaussian, max_tokens=64, seed=seed))

    a, b, c = run(0), run(0), run(1)
    assert a.removed == b.removed and a.scores.block_table()["mi"] == b.scores.block_table()["mi"]
    assert a.scores.block_table()["mi"] != c.scores.block_table()["mi"]


def test_self_generated_calibration(tiny_models):
    """`self`: the model's own sampled text, the same for a seed, other text for another seed."""
    loaded = load_model(str(tiny_models["llama"]))
    opts = Plan(remove=2, calibration=CalibrationSpec("self", n_samples=3, seq_len=16, seed=5))
    result = prune(loaded, opts)
    ids = result.calibration_ids
    assert ids.shape == (3, 16) and not torch.equal(ids[0], ids[1]) and len(ids.unique()) > 8
    again = prune(load_model(str(tiny_models["llama"])), opts)
    assert torch.equal(ids, again.calibration_ids)
    other = prune(load_model(str(tiny_models["llama"])), opts.model_copy(update={"calibration": CalibrationSpec("self", 3, 16, 6)}))
    assert not torch.equal(ids, other.calibration_ids)


def test_compensated_verification_uses_the_compensation_windows(tiny_models, calib_txt):
    """Proposals are scored with maps fitted like the shipped ones: on the --compensation-samples windows."""
    from mi_prun.calibration import calibration_batches
    from mi_prun.verify import RemovalScorer

    loaded = load_model(str(tiny_models["llama"]))
    opts = options(calib_txt, method=Method.mi_prun, remove=3, compensation_samples=6)
    result = prune(loaded, opts)
    candidates = result.selection.candidates
    distinct = {tuple(c.removed) for c in candidates}
    assert len(distinct) > 1, "this setting must give differing proposals, or nothing is verified"
    assert "6 windows" in result.selection.verification
    fit_ids = calibration_batches(loaded, opts.calibration.model_copy(update={"n_samples": 6}))
    again = RemovalScorer(loaded, Windows(fit_ids), compensate=True)
    for c in candidates:
        assert c.calibration_nll == pytest.approx(again(c.removed), rel=1e-6)
    # scored on the 4 scoring windows instead, the numbers differ
    scoring = RemovalScorer(loaded, Windows(result.calibration_ids), compensate=True)
    assert any(c.calibration_nll != pytest.approx(scoring(c.removed), rel=1e-6) for c in candidates)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_compensated_objective_and_swaps(model_type, tiny_models, calib_txt):
    """The compensated objective proposes from the capture's projection taps; swaps of the best
    proposal are scored by the same verifier, each recording its per-window NLLs."""
    from mi_prun.plan import Objective

    loaded = load_model(str(tiny_models[model_type]))
    opts = options(calib_txt, remove=2, objectives=(Objective.channel, Objective.compensated), swaps=2)
    result = prune(loaded, opts)
    info = result.selection
    labels = [c.objective for c in info.candidates]
    assert labels[:2] == ["channel", "compensated"] and "swap (compensated)" in labels
    assert result.scores.recovery is not None and result.scores.recovery.measured >= TINY_BLOCKS
    assert info.verified == len({tuple(c.removed) for c in info.candidates}) and info.verification_s > 0
    # every removal scored recorded its per-window NLLs, and a challenger's p-value when it differed
    assert all(c.window_nll is not None and len(c.window_nll) == len(info.candidates[0].window_nll) for c in info.candidates)
    assert result.removed in [c.removed for c in info.candidates]
    # without the compensated objective or swaps, the capture keeps no taps
    plain = prune(loaded, options(calib_txt, remove=2))
    assert plain.scores.recovery is None and "compensated" not in [c.objective for c in plain.selection.candidates]


def test_profile_splits_each_stage_and_counts_block_forwards(tiny_models, calib_txt, tmp_path):
    """pruning.json's profile: each stage's parts sum to its wall time with "other"; the capture is
    exactly one pass of every block over the calibration windows; verification runs no fewer
    block-forwards than the least its proposals need, and compensated verification no more than
    twice that (it runs, per half, the kept block of each run and the blocks after it)."""
    from mi_prun.profile import PROFILE, Part

    loaded = load_model(str(tiny_models["llama"]))
    opts = options(calib_txt, remove=2)
    result = prune(loaded, opts)
    manifest = save_pruned(loaded, opts, result, tmp_path / "out")
    profile = PruningManifest.read(tmp_path / "out").profile_s
    for stage in ("calibrate", "capture", "select", "compensate", "repack"):
        assert sum(profile[stage].values()) == pytest.approx(manifest.timings_s[stage], abs=5e-3), stage
    assert profile["capture"][Part.forward.value] > 0 and profile["compensate"][Part.ridge.value] > 0
    assert manifest.block_forwards["capture"] == TINY_BLOCKS * 4
    least = manifest.selection.block_forwards_minimum
    verified = [c for c in manifest.selection.candidates if c.calibration_nll is not None]
    assert len(verified) >= 2 and least > TINY_BLOCKS * 4
    done = manifest.block_forwards["capture"] + manifest.block_forwards["select"]
    assert least <= done <= 2 * least
    # Nested parts count in the innermost only.
    before = PROFILE.snapshot()
    with PROFILE.part("outer"):
        with PROFILE.part("inner"):
            sum(range(200000))
    parts, _ = PROFILE.since(before)
    assert parts["inner"] > 0 and parts["outer"] < parts["inner"]
