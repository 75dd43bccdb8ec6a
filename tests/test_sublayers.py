"""Sublayer pruning: the chain of attention and feed-forward units, its selection at a byte budget,
its compensation, and the deci GGUF it ships as, checked in llama.cpp and against transformers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mi_prun import select, sublayers
from mi_prun.cli import app
from mi_prun.compensate import fit_compensation, plain_runs
from mi_prun.evaluate import final_states
from mi_prun.linear_attention import LinearAttention, LinearMap
from mi_prun.errors import UserError
from mi_prun.load import load_model
from mi_prun.manifest import PruningManifest
from mi_prun.plan import ExportPlan, Granularity, Method, Plan, RunMap
from mi_prun.runner import Windows
from mi_prun.runtimes import llamacpp
from mi_prun.runtimes.deci import Attention, LayerForm, write_deci
from mi_prun.runtimes.gguf_prune import open_gguf, rewrite_gguf
from mi_prun.repack import save_checkpoint
from mi_prun.runtimes.parity import compare_logits, transformers_logits
from mi_prun.sublayer_maps import fit_unit_maps, shipped_weights
from mi_prun.verify import RemovalScorer

from .conftest import TINY_BLOCKS, WIKI_TEST

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def wiki_ids(path, n):
    return llamacpp.tokenize(path, WIKI_TEST.read_text(encoding="utf-8")[:20000])[:n]


def test_deci_rewrite_computes_the_llama_model_with_those_sublayers_zeroed(tiny_q8_0_gguf, tmp_path):
    """A deci layer without attention, one with a zero feed-forward stub (attention kept) and a
    dropped layer compute in llama.cpp what the llama GGUF computes with those projections zeroed."""
    forms = [LayerForm() for _ in range(TINY_BLOCKS)]
    forms[1] = LayerForm(Attention.removed, True)
    forms[2] = LayerForm(Attention.kept, False)
    forms[4] = LayerForm(Attention.removed, False)
    forms[6] = LayerForm(Attention.removed, True)
    forms[7] = LayerForm(Attention.kept, False)
    deci = tmp_path / "deci.gguf"
    report = write_deci(tiny_q8_0_gguf, deci, forms)
    heads = int(open_gguf(tiny_q8_0_gguf).get_field("llama.attention.head_count").contents())
    assert report.layers == TINY_BLOCKS - 1 and report.stub_ffn_layers == [2, 6]
    assert report.head_count == [heads, 0, heads, heads, heads, 0, heads]

    reader = open_gguf(deci)
    assert reader.get_field("general.architecture").contents() == "deci"
    assert reader.get_field("deci.feed_forward_length").contents()[2] == 1
    names = {t.name for t in reader.tensors}
    assert "blk.1.attn_q.weight" not in names and "blk.1.ffn_up.weight" in names and "blk.4.attn_q.weight" in names
    kept_bytes = {t.name: bytes(t.data) for t in reader.tensors}
    assert kept_bytes["blk.3.ffn_up.weight"] == bytes(next(t.data for t in open_gguf(tiny_q8_0_gguf).tensors
                                                           if t.name == "blk.3.ffn_up.weight"))

    shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in open_gguf(tiny_q8_0_gguf).tensors}
    zeroed = ["blk.1.attn_output.weight", "blk.6.attn_output.weight", "blk.2.ffn_down.weight", "blk.7.ffn_down.weight"]
    reference = tmp_path / "zeroed.gguf"
    rewrite_gguf(tiny_q8_0_gguf, reference, removed=[4], replace={n: np.zeros(shapes[n], np.float32) for n in zeroed},
                 replace_type=lambda _: gguf.GGMLQuantizationType.F32)
    tokens = wiki_ids(deci, 256)
    parity = compare_logits(llamacpp.logits(reference, tokens), llamacpp.logits(deci, tokens))
    assert parity.top1 == 1.0 and parity.mean_kl < 1e-6, parity


def test_linear_attention_build_ships_what_transformers_computes_with_that_map(tiny_q8_0_gguf, calib_txt, tmp_path):
    """--linear-attention 2: the two attention sublayers that cost least as linear maps become deci
    linear attentions (no q/k/v, no KV cache); llama.cpp computes what transformers computes with
    the map read back from the GGUF in the attention's place and the removed sublayers zeroed."""
    out = tmp_path / "build"
    result = invoke("build", "--granularity", "sublayer", "--linear-attention", 2, "--no-compensate", "--model", tiny_q8_0_gguf,
                    "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--remove", 2, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    sub = manifest.sublayers
    chosen = [m.block for m in sub.linear_attention]
    candidates = sub.linear_candidates_nll
    assert len(chosen) == 2 and set(candidates) == {b for b in range(TINY_BLOCKS) if 2 * b not in sub.removed_units}
    assert sorted(candidates, key=candidates.get)[:2] == sorted(chosen, key=candidates.get)
    assert all(0 < m.heldout_error_ratio <= 1 for m in sub.linear_attention) and sub.calibration_nll is not None

    [e] = manifest.exports
    reader = open_gguf(out / e.file)
    kept = manifest.kept
    written = {b: kept.index(b) for b in chosen}
    heads_kv = reader.get_field("deci.attention.head_count_kv").contents()
    assert [heads_kv[i] for i in written.values()] == [0, 0] and all(reader.get_field("deci.attention.head_count").contents()[i] > 0
                                                                    for i in written.values())
    tensors = {t.name: t for t in reader.tensors}
    assert not any(f"blk.{i}.attn_{p}.weight" in tensors for i in written.values() for p in "qkv")
    maps = [LinearMap(b, 0.0, 1.0, 1.0, torch.from_numpy(np.array(gguf.quants.dequantize(tensors[f"blk.{i}.attn_output.weight"].data,
                                                                                        tensors[f"blk.{i}.attn_output.weight"].tensor_type))))
            for b, i in written.items()]

    loaded = load_model(str(tiny_q8_0_gguf))
    hf = tmp_path / "reference"
    save_checkpoint(loaded, kept, [], hf, shipped_weights(loaded, sub.removed_units, [], maps))
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    for i in written.values():
        layer = model.model.layers[i]
        layer.self_attn = LinearAttention(layer.self_attn.o_proj)
    tokens = wiki_ids(out / e.file, 256)
    # The block runner (what --eval and the selection run) computes what transformers does with the maps in place.
    ids = torch.tensor([tokens])
    runner_final, _ = final_states(loaded.runner, ids, plain_runs(manifest.removed), rewritten=shipped_weights(loaded, sub.removed_units, [], maps),
                                   linear_attention=chosen)
    with torch.no_grad():
        assert torch.allclose(loaded.runner.logits(runner_final[0]), model(input_ids=ids).logits[0], atol=1e-3)
    parity = compare_logits(transformers_logits(model, tokens), llamacpp.logits(out / e.file, tokens))
    # llama.cpp multiplies q8_0 weights with q8_0-rounded activations and this random model's logits
    # lie close together, so a few top-1 ties flip; with the attention left in (the map not applied)
    # the same comparison measured KL 0.056 and top-1 14%.
    assert parity.mean_kl < 1e-3 and parity.top1 >= 0.9, parity
    # No KV cache for them: against the source's, the share of layers that keep KV heads.
    with_kv = sum(1 for v in heads_kv if v > 0)
    assert llamacpp.kv_cache_bytes(out / e.file) / llamacpp.kv_cache_bytes(tiny_q8_0_gguf) == pytest.approx(with_kv / TINY_BLOCKS, abs=1e-2)


def test_sized_fast_block_select_reaches_the_budget_by_less_than_one_unit():
    rng = np.random.default_rng(0)
    cost = list(rng.uniform(0.01, 0.5, 12))
    run_cost = select.additive_over_blocks(cost)
    assert select.fast_block_select(12, 4, cost, run_cost, sizes=[1] * 12) == select.fast_block_select(12, 4, cost, run_cost)
    sizes = [1, 3] * 6
    removed, _ = select.fast_block_select(12, 10, cost, run_cost, sizes=sizes)
    assert 10 <= sum(sizes[u] for u in removed) < 10 + max(sizes)
    assert select.lowest_until([0.3, 0.1, 0.2, 0.4], [1, 3, 1, 3], 4) == [1, 2]
    assert select.contiguous_until([1, 3, 1, 3], 4, lambda a, b: {(0, 1): 0.5, (1, 2): 0.2, (2, 3): 0.4, (3, 3): 0.9}[(a, b)]) == [1, 2]


def test_a_whole_block_of_units_scores_and_compensates_as_the_block(tiny_models):
    """Two paths agree: the units of blocks 2-3 removed score the calibration NLL of blocks 2-3
    removed, and their map (fitted from the chain's states alone) equals the block map fitted
    through the runner."""
    loaded = load_model(str(tiny_models["llama"]))
    torch.manual_seed(0)
    ids = torch.randint(0, 384, (8, 48))
    windows = Windows(ids)
    chain = sublayers.capture_chain(loaded, windows)
    assert len(chain.dense) == 2 * TINY_BLOCKS + 1 and torch.equal(chain.dense[2 * TINY_BLOCKS], windows.dense[TINY_BLOCKS])
    with torch.no_grad():
        hidden = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.allclose(chain.dense[6], hidden[3], atol=1e-5)  # entering block 3's attention
    units = [4, 5, 6, 7]
    plain = sublayers.UnitRemovalScorer(loaded, windows, chain, compensate=False)(units)
    assert plain == pytest.approx(RemovalScorer(loaded, windows)([2, 3]), rel=1e-6)
    [unit_map] = fit_unit_maps(loaded, chain, units)
    [block_map], _ = fit_compensation(loaded.runner, loaded.spec, [2, 3], windows)
    assert unit_map.prev == 3 and block_map.prev == 1 and unit_map.ridge == block_map.ridge
    assert torch.allclose(unit_map.weight, block_map.weight, rtol=1e-4, atol=1e-6)


def test_sublayer_greedy_search_counts_each_removal_it_scores(tiny_q8_0_gguf, calib_txt, tmp_path):
    """BlockPruner's search per sublayer scores every remaining unit at every step: `verified` counts
    those removals (as for blocks), each scored on both halves of the windows (maps cross-fitted),
    and with --compensation-samples on the compensation windows, captured in a pass of their own."""
    out = tmp_path / "build"
    result = invoke("build", "--granularity", "sublayer", "--method", "sleb", "--model", tiny_q8_0_gguf, "--calib", calib_txt,
                    "--n-samples", 4, "--compensation-samples", 6, "--seq-len", 64, "--remove", 1, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    steps = len(manifest.sublayers.removed_units)
    info = manifest.selection
    assert info.verified == sum(2 * TINY_BLOCKS - k for k in range(steps))
    assert info.forward_passes == 2 + 2 * info.verified  # two captures, then two halves per removal
    assert manifest.compensation.samples == 6


@pytest.mark.slow  # the converter route; the deci rewrite is checked fast above, the default model as deci in test_real_sublayers
def test_sublayer_build_from_a_folder_ships_deci_matching_transformers(export_models, calib_txt, tmp_path):
    out = tmp_path / "build"
    result = invoke("build", "--granularity", "sublayer", "--method", "shortgpt", "--model", export_models["llama"],
                    "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--remove", 2, "--gguf-type", "f16",
                    "--keep-hf", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    sub = manifest.sublayers
    assert sub.bytes_removed >= sub.budget_bytes == 2 * sum(sub.unit_bytes) // TINY_BLOCKS
    partial = {u // 2 for u in sub.removed_units} - set(sub.dropped_blocks)
    assert partial, sub.removed  # some block keeps one of its sublayers
    [e] = manifest.exports
    reader = open_gguf(out / e.file)
    assert reader.get_field("general.architecture").contents() == "deci"
    assert e.check["block_count"] == TINY_BLOCKS - len(sub.dropped_blocks) == manifest.blocks_after
    # Plain transformers loads the checkpoint (removed sublayers as zero projections) ...
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    kept = manifest.kept
    for u in sub.removed_units:
        if u // 2 in kept:
            layer = model.model.layers[kept.index(u // 2)]
            weight = layer.self_attn.o_proj.weight if u % 2 == 0 else layer.mlp.down_proj.weight
            assert not weight.any()
    # ... and llama.cpp computes the same model from the deci GGUF.
    tokens = wiki_ids(out / e.file, 512)
    parity = compare_logits(transformers_logits(model, tokens), llamacpp.logits(out / e.file, tokens))
    assert parity.top1 >= 0.99 and parity.mean_kl < 1e-3, parity


def test_sublayer_plans_refuse_what_they_cannot_ship(tiny_models, export_models, tmp_path):
    with pytest.raises(UserError, match="--granularity sublayer chooses with"):
        Plan.make(granularity=Granularity.sublayer, method=Method.ppl, remove=1)
    gemma = invoke("build", "--granularity", "sublayer", "--model", tiny_models["gemma3_text"], "--remove", 1, "--out", tmp_path / "g")
    assert gemma.exit_code != 0 and "deci" in gemma.output and "gemma3_text is not one" in gemma.output
    onnx = invoke("build", "--granularity", "sublayer", "--target", "onnx", "--model", export_models["llama"], "--remove", 1,
                  "--out", tmp_path / "o")
    assert onnx.exit_code != 0 and "use --target gguf" in onnx.output
    block = invoke("build", "--linear-attention", 1, "--model", export_models["llama"], "--remove", 1, "--out", tmp_path / "b")
    assert block.exit_code != 0 and "use it with --granularity sublayer" in block.output
    with pytest.raises(UserError, match="--run-map places the maps of removed sublayers"):
        Plan.make(run_map=RunMap.fold, remove=1)
    # Slot maps only where a deci GGUF alone is written: prune and --keep-hf write plain transformers.
    sublayer = dict(granularity=Granularity.sublayer, remove=1)
    assert Plan.make(**sublayer, export=ExportPlan()).run_map_slots
    assert not any(Plan.make(**sublayer, **o).run_map_slots for o in (
        {}, dict(export=ExportPlan(keep_hf=True)), dict(export=ExportPlan(), run_map=RunMap.fold), dict(export=ExportPlan(), compensate=False)))
    keep = invoke("build", "--granularity", "sublayer", "--linear-attention", 1, "--keep-hf", "--model", export_models["llama"],
                  "--remove", 1, "--out", tmp_path / "k")
    assert keep.exit_code != 0 and "drop --keep-hf" in keep.output
    many = invoke("build", "--granularity", "sublayer", "--linear-attention", TINY_BLOCKS - 2, "--model", export_models["llama"],
                  "--remove", 2, "--out", tmp_path / "m")
    assert many.exit_code != 0 and f"replace fewer than {TINY_BLOCKS - 2}" in many.output
    assert not any((tmp_path / d).exists() for d in "gobkm")


def test_a_removed_run_carries_its_map_in_the_form_with_the_lower_heldout_error(tiny_models):
    """With slots, each run's map is the fold or the attention-slot map, whichever has the lower
    held-out error; a run starting at unit 0 (nothing before it to fold into) gets a slot map, and
    a run without an attention sublayer reading its input (a lone feed-forward unit) only a fold."""
    from mi_prun.linear_attention import fit_slot
    from mi_prun.sublayer_maps import dropped_blocks, slot_of

    assert [slot_of(*r) for r in ((4, 7), (5, 7), (5, 5), (0, 0), (3, 4), (3, 3))] == [2, 3, None, 0, 2, None]
    loaded = load_model(str(tiny_models["llama"]))
    torch.manual_seed(0)
    windows = Windows(torch.randint(0, 384, (8, 48)))
    chain = sublayers.capture_chain(loaded, windows)
    removed = [0, 1, 4, 5, 6, 7, 9]
    folds = fit_unit_maps(loaded, chain, removed)
    maps = fit_unit_maps(loaded, chain, removed, slots=True)
    assert [(r.first, r.last) for r in maps] == [(0, 1), (4, 7), (9, 9)]
    assert folds[0].weight is None and maps[0].slot == 0 and maps[0].weight is not None  # nothing to fold into: the slot
    assert maps[2].slot is None and torch.equal(maps[2].weight, folds[2].weight)  # 4.ffn alone: no attention slot
    slot = fit_slot(loaded, 2, chain.dense[4], chain.dense[8], chain.index)
    chosen = maps[1]
    assert chosen.heldout_ratio == min(slot.heldout_ratio, folds[1].heldout_ratio)
    assert (chosen.slot == 2) == (slot.heldout_ratio < folds[1].heldout_ratio)
    # A block whose attention slot holds a map stays in the model.
    assert dropped_blocks(removed) == [0, 2, 3] and dropped_blocks(removed, [0]) == [2, 3]


def test_sublayer_build_ships_a_runs_slot_map_as_deci_linear_attention(tiny_q8_0_gguf, calib_txt, tmp_path):
    """The default sublayer build of a run whose map is best in its attention slot: that layer
    ships as deci linear attention with a zero feed-forward stub (no q/k/v, no KV cache), and
    llama.cpp computes what transformers computes with the map read back from the GGUF there."""
    out = tmp_path / "build"
    # Angular removes one contiguous run (MI-PRUN takes lone feed-forward sublayers of this random model).
    result = invoke("build", "--granularity", "sublayer", "--method", "angular", "--model", tiny_q8_0_gguf, "--calib", calib_txt,
                    "--n-samples", 4, "--seq-len", 64, "--remove", 2, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    sub, runs = manifest.sublayers, manifest.compensation.runs
    slots = [r.slot for r in runs if r.slot is not None]
    assert slots, runs
    assert all(r.folded_into is None and r.weight == "self_attn.o_proj.weight" for r in runs if r.slot is not None)
    assert set(slots) <= set(manifest.kept) and not set(slots) & set(sub.dropped_blocks)
    [e] = manifest.exports
    reader = open_gguf(out / e.file)
    written = {b: manifest.kept.index(b) for b in slots}
    heads, heads_kv = (reader.get_field(f"deci.attention.{k}").contents() for k in ("head_count", "head_count_kv"))
    assert all(heads[i] > 0 and heads_kv[i] == 0 for i in written.values())
    tensors = {t.name: t for t in reader.tensors}
    assert not any(f"blk.{i}.attn_{p}.weight" in tensors for i in written.values() for p in "qkv")

    def read(name):
        return torch.from_numpy(np.array(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)))

    loaded = load_model(str(tiny_q8_0_gguf))
    # The reference: transformers with the output projection of every kept sublayer and every
    # slot read back from the GGUF (rewritten or not), the removed sublayers' zero (a removed
    # feed-forward network's GGUF tensor is a width-1 stub), and the slots' attention as the map alone.
    params, removed = dict(loaded.model.named_parameters()), set(sub.removed_units)
    weights = {}
    for b, i in ((b, manifest.kept.index(b)) for b in manifest.kept):
        for unit, gguf_name, hf_name in ((2 * b, "attn_output", "self_attn.o_proj.weight"), (2 * b + 1, "ffn_down", "mlp.down_proj.weight")):
            param = loaded.spec.block_param(b, hf_name)
            shipped = unit not in removed or (unit % 2 == 0 and b in slots)
            weights[param] = read(f"blk.{i}.{gguf_name}.weight") if shipped else torch.zeros_like(params[param])
    hf = tmp_path / "reference"
    save_checkpoint(loaded, manifest.kept, [], hf, weights)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    for i in written.values():
        layer = model.model.layers[i]
        layer.self_attn = LinearAttention(layer.self_attn.o_proj)
    tokens = wiki_ids(out / e.file, 256)
    parity = compare_logits(transformers_logits(model, tokens), llamacpp.logits(out / e.file, tokens))
    assert parity.mean_kl < 1e-3 and parity.top1 >= 0.9, parity
    # No KV cache for a slot's layer: the cache is that of the layers that keep KV heads.
    with_kv = sum(1 for v in heads_kv if v > 0)
    assert llamacpp.kv_cache_bytes(out / e.file) / llamacpp.kv_cache_bytes(tiny_q8_0_gguf) == pytest.approx(with_kv / TINY_BLOCKS, abs=1e-2)
