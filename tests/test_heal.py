"""Healing (build --heal): LoRA distillation toward the dense model, merged into plain weights that
every exporter writes; the loaded model is left as it was."""

from __future__ import annotations

import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mi_prun.runtimes import llamacpp
from mi_prun.runtimes.gguf_prune import open_gguf
from mi_prun.runtimes.parity import compare_logits, transformers_logits
from mi_prun.archs import get_path
from mi_prun.blockset import blocks_kept, keep_indices
from mi_prun.calibration import PYTHON_DOCS, calibration_batches, python_docs_text, tokenize_text, windows_from_ids
from mi_prun.cli import app
from mi_prun.compensate import removal_runs, replaced
from mi_prun.evaluate import evaluate, final_states, strided_windows
from mi_prun.heal import fold_healed, heal, heal_windows, healed_blocks
from mi_prun.load import load_model, resolve_source
from mi_prun.manifest import PruningManifest
from mi_prun.pipeline import prune
from mi_prun.plan import CalibrationSpec, EvalPlan, Execution, HealObjective, HealPlan, HealPrecision, Plan, default_heal_text
from mi_prun.quality import calibration_overlap, measure_quality

from .conftest import TINY_BLOCKS, WIKI_TEST, build_export_model

runner = CliRunner()


def test_healed_blocks_are_the_kept_neighbours_of_each_cut():
    assert healed_blocks([0, 1, 5, 6, 7], [2, 3, 4]) == [1, 5]
    assert healed_blocks([1, 2, 4, 5], [0, 3, 6, 7]) == [1, 2, 4, 5]
    assert healed_blocks([0, 1, 5, 6, 7, 8, 9], [2, 3, 4], reach=3) == [0, 1, 5, 6, 7]


def test_heal_text_joins_the_windows_of_each_source(tiny_models, calib_txt):
    """`FILE+python-docs`: --heal-samples windows of the file, then as many of Python's documentation."""
    loaded = load_model(str(tiny_models["llama"]))
    ids = heal_windows(loaded, HealPlan(source=f"{calib_txt}+{PYTHON_DOCS}", samples=3, seq_len=32), seed=0)
    assert ids.shape == (6, 32)
    assert torch.equal(ids[:3], calibration_batches(loaded, CalibrationSpec(str(calib_txt), 3, 32, 1)))
    docs = windows_from_ids(tokenize_text(loaded.tokenizer, python_docs_text()), 3, 32)
    assert torch.equal(ids[3:], docs)
    # Python's own reference topics, every one of them, in the standard library's order.
    from pydoc_data.topics import topics

    assert python_docs_text().split("\n\n")[0] == next(iter(topics.values())).split("\n\n")[0]
    assert all(t in python_docs_text() for t in (topics["assert"], topics["lambda"]))


def test_heal_text_defaults_to_128_windows_of_a_text_read_or_what_a_short_one_holds(tiny_models, calib_txt, tmp_path):
    """With no --heal-samples, each text read gives up to 128 windows (a short file all it holds);
    a file whose name holds `+` stays one source."""
    loaded = load_model(str(tiny_models["llama"]))
    short = tmp_path / "notes+more.txt"
    short.write_text(calib_txt.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    held = tokenize_text(loaded.tokenizer, short.read_text(encoding="utf-8")).numel() // 32
    assert 1 <= held < 128
    plan = HealPlan(source=f"{short}+{PYTHON_DOCS}", seq_len=32)
    assert plan.sources() == (str(short), PYTHON_DOCS)
    ids = heal_windows(loaded, plan, seed=0)
    assert ids.shape == (held + 128, 32)
    assert torch.equal(ids[held:], windows_from_ids(tokenize_text(loaded.tokenizer, python_docs_text()), 128, 32))
    # The documentation is what joins a user's text by default, not a second copy of itself.
    assert default_heal_text(str(short)) == f"{short}+{PYTHON_DOCS}" and default_heal_text(PYTHON_DOCS) == PYTHON_DOCS


def kl_to_dense(loaded, removed, runs, windows) -> float:
    final, dense = final_states(loaded.runner, windows.ids, removal_runs(removed, runs))
    return evaluate(loaded.runner, final, windows, (loaded.runner, dense)).kl


@pytest.mark.parametrize("precision", [HealPrecision.fp32, HealPrecision.bf16])
def test_heal_lowers_the_kl_to_dense_and_leaves_the_model_as_it_was(tiny_models, calib_txt, precision):
    loaded = load_model(str(tiny_models["llama"]))
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    result = prune(loaded, Plan(remove=3, calibration=CalibrationSpec(str(calib_txt), 8, 64)))
    plan = HealPlan(steps=40, samples=16, seq_len=64, source=str(calib_txt), learning_rate=2e-3, precision=precision)
    healed = heal(loaded, result.kept, result.removed, result.compensation, plan)
    # bf16 autocast (the default where the CPU has native bf16 units) trains the float32 adapters as well.
    assert healed.info.precision == {"fp32": "float32", "bf16": "bfloat16"}[precision.value]
    for name, w in healed.weights.items():
        assert w.dtype == before[name].dtype, name
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not any("lora" in n for n, _ in loaded.model.named_parameters())
    assert not hasattr(loaded.model, "peft_config")  # the same model heals again cleanly (frontier builds several)
    blocks = healed_blocks(result.kept, result.removed, plan.reach)
    assert healed.info.blocks == blocks and healed.info.steps == 40
    again = heal(loaded, result.kept, result.removed, result.compensation, plan.model_copy(update={"steps": 2}))
    assert set(again.weights) == set(healed.weights) and again.info.steps == 2
    # A spent --heal-minutes budget (counted from the start of the heal stage) trains nothing.
    spent = heal(loaded, result.kept, result.removed, result.compensation, plan.model_copy(update={"minutes": 1e-6}))
    assert spent.info.steps <= 1
    # The adapted projections of the blocks beside each cut, and the norm weights of every kept block.
    norms = [n for n, _ in loaded.spec.heal_norms]
    assert healed.info.norms == norms == ["input_layernorm", "post_attention_layernorm"]
    assert set(healed.weights) == ({f"model.layers.{b}.{m}.weight" for b in blocks for m, _ in loaded.spec.heal_modules}
                                   | {f"model.layers.{b}.{n}.weight" for b in result.kept for n in norms})
    assert not any(torch.equal(w, before[name]) for name, w in healed.weights.items())
    # --no-heal-norms trains the adapters alone.
    plain_heal = heal(loaded, result.kept, result.removed, result.compensation, plan.model_copy(update={"steps": 2, "norms": False}))
    assert plain_heal.info.norms == [] and set(plain_heal.weights) == {n for n in healed.weights if "layernorm" not in n}
    assert healed.info.kl_last < healed.info.kl_first
    # On held-out text (not the heal text), the healed weights bring the pruned model nearer to dense.
    ids = loaded.tokenizer(WIKI_TEST.read_text(encoding="utf-8")[:20000], return_tensors="pt").input_ids[0]
    windows = strided_windows(ids, 64, max_windows=8)
    plain = kl_to_dense(loaded, result.removed, result.compensation, windows)
    with replaced(loaded.model, healed.weights):
        # a healed projection of a compensated block becomes that run's weight, as build ships it
        fold_healed(result.compensation, healed.weights, loaded.spec)
        after = kl_to_dense(loaded, result.removed, result.compensation, windows)
    assert after < plain


def test_a_model_held_in_bfloat16_heals_its_adapters_not_its_norms(tiny_models, calib_txt):
    """A step of the learning rate is below a bfloat16 norm weight's resolution near 1: the norms are
    left out (and the manifest says so), the adapters still train."""
    loaded = load_model(str(tiny_models["llama"]), dtype="bfloat16")
    plan = HealPlan(steps=2, samples=4, seq_len=32, source=str(calib_txt))
    healed = heal(loaded, [0, 1, 2, 5, 6, 7], [3, 4], [], plan)
    assert healed.info.norms == [] and healed.info.norm_blocks == [] and healed.info.steps == 2
    assert set(healed.weights) == {f"model.layers.{b}.{m}.weight" for b in (2, 5) for m, _ in loaded.spec.heal_modules}


def test_quality_puts_healed_weights_in_the_pruned_model_only(tiny_models, tmp_path):
    """build --heal --eval: the reference is the dense model as given, the pruned one holds the healed weights."""
    loaded = load_model(str(tiny_models["llama"]))
    text = tmp_path / "eval.txt"
    text.write_text(WIKI_TEST.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    evaluation = EvalPlan(data=str(text), windows=4, seq_len=64)
    removed = [4, 5]
    name = "model.layers.2.mlp.up_proj.weight"  # a kept block before the cut, rewritten as healing rewrites it
    rewritten = {name: dict(loaded.model.named_parameters())[name].detach() * 1.5}
    plain = measure_quality(loaded, removed, [], evaluation)
    healed = measure_quality(loaded, removed, [], evaluation, rewritten=rewritten)
    assert healed.dense_ppl == plain.dense_ppl
    # The pruned model as transformers runs it: blocks skipped, the rewritten weight in place.
    ids = strided_windows(tokenize_text(loaded.tokenizer, text.read_text(encoding="utf-8")), 64, max_windows=4).ids
    with torch.no_grad(), replaced(loaded.model, rewritten), blocks_kept(loaded.model, loaded.spec, keep_indices(8, removed)):
        logits = loaded.model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert healed.pruned_ppl == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert healed.pruned_ppl != pytest.approx(plain.pruned_ppl, rel=1e-3)


def test_build_heal_writes_healed_weights_in_place_and_llama_cpp_runs_them(tiny_q8_0_gguf, calib_txt, smol_tokenizer, tmp_path):
    src = tiny_q8_0_gguf
    out = tmp_path / "build"
    result = runner.invoke(app, [str(a) for a in (
        "build", "--target", "gguf", "--model", src, "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--remove", 2,
        "--heal", "--heal-steps", 5, "--heal-samples", 8, "--heal-reach", 2, "--heal-rank", 4, "--keep-hf", "--out", out, "--quiet")])
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    assert manifest.heal is not None and manifest.heal.steps == 5
    # The heal text follows --calib, joined by Python's documentation, unless --heal-text says otherwise.
    assert manifest.heal.text == f"{calib_txt}+python-docs" and manifest.heal.windows == 2 * 8
    assert manifest.plan.heal.reach == 2 and manifest.heal.blocks == healed_blocks(manifest.kept, manifest.removed, 2)
    assert manifest.plan.heal.rank == manifest.heal.rank == 4
    assert manifest.plan.heal is not None and "heal" in manifest.timings_s
    card = (out / "README.md").read_text()
    assert f"| healing | LoRA rank 4 on" in card and f"of blocks {manifest.heal.blocks}" in card and "merged into the weights" in card
    [e] = manifest.exports
    position = {old: new for new, old in enumerate(manifest.kept)}
    rewritten = e.check["tensors_replaced"]
    for b in manifest.heal.blocks:
        for name in ("attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert rewritten.get(f"blk.{b}.{name}.weight") == "Q8_0", rewritten
    # Every kept block's trained norm weights, in the norms' own type (no file growth).
    assert manifest.heal.norms == ["input_layernorm", "post_attention_layernorm"]
    for b in manifest.kept:
        assert rewritten.get(f"blk.{b}.attn_norm.weight") == rewritten.get(f"blk.{b}.ffn_norm.weight") == "F32", rewritten
    # The GGUF holds what the healed checkpoint holds (up to Q8_0 rounding) ...
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    tensors = {t.name: t for t in open_gguf(out / e.file).tensors}
    b = manifest.heal.blocks[0]
    t = tensors[f"blk.{position[b]}.ffn_up.weight"]
    expected = hf.model.layers[position[b]].mlp.up_proj.weight.detach().numpy()
    np.testing.assert_allclose(gguf.quants.dequantize(t.data, t.tensor_type), expected, atol=np.abs(expected).max() / 127)
    # ... and llama.cpp runs it as transformers runs the checkpoint.
    tokens = smol_tokenizer(WIKI_TEST.read_text(encoding="utf-8")[:4000], add_special_tokens=False)["input_ids"][:200]
    parity = compare_logits(transformers_logits(hf, tokens), llamacpp.logits(out / e.file, tokens))
    assert parity.top1 >= 0.9, parity


@pytest.mark.slow  # 46 s; the fast run heals llama in place (test_build_heal_writes_healed_weights_in_place_and_llama_cpp_runs_them): make test-slow
def test_build_heal_gemma3_in_place_writes_its_norms_as_llama_cpp_reads_them(smol_tokenizer, calib_txt, tmp_path):
    """Gemma 3 scales by (1 + w): healed norm weights go into a GGUF pruned in place as the scale
    itself, as the converter writes them, and llama.cpp runs the file as transformers runs the checkpoint."""
    from mi_prun.runtimes.gguf_export import convert

    # Shaped like the real Gemma 3 (every 6th layer global, head_dim = query_pre_attn_scalar = 256; test_gguf.py).
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(TINY_BLOCKS)]
    folder = build_export_model("gemma3_text", tmp_path / "gemma", smol_tokenizer, layer_types=pattern, head_dim=256,
                                query_pre_attn_scalar=256)
    src = tmp_path / "gemma.f32.gguf"
    convert(folder, src, "f32")
    out = tmp_path / "build"
    result = runner.invoke(app, [str(a) for a in (
        "build", "--target", "gguf", "--model", src, "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--remove", 2,
        "--no-verify", "--heal", "--heal-steps", 6, "--heal-samples", 4, "--keep-hf", "--out", out, "--quiet")])
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    assert manifest.heal.norms == ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                   "post_feedforward_layernorm"]
    [e] = manifest.exports
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    tensors = {t.name: t for t in open_gguf(out / e.file).tensors}
    dense = {t.name: t for t in open_gguf(src).tensors}
    for new, old in enumerate(manifest.kept):
        layer = hf.model.layers[new]
        for module, name in (("input_layernorm", "attn_norm"), ("pre_feedforward_layernorm", "ffn_norm")):
            written = np.asarray(tensors[f"blk.{new}.{name}.weight"].data)
            np.testing.assert_allclose(written, get_path(layer, module).weight.detach().numpy() + 1.0, rtol=1e-6)
            assert not np.allclose(written, np.asarray(dense[f"blk.{old}.{name}.weight"].data))  # trained
    tokens = smol_tokenizer(WIKI_TEST.read_text(encoding="utf-8")[:4000], add_special_tokens=False)["input_ids"][:200]
    parity = compare_logits(transformers_logits(hf, tokens), llamacpp.logits(out / e.file, tokens))
    assert parity.top1 >= 0.99 and parity.mean_kl < 1e-3, parity


@pytest.mark.slow  # a whole build --heal: make test-slow
def test_build_heal_on_self_calibration_heals_on_self_and_python_docs(export_models, tmp_path):
    """With no data (--calib self), the heal text is the model's own text and Python's documentation."""
    out = tmp_path / "out"
    result = runner.invoke(app, [str(a) for a in (
        "build", "--target", "gguf", "--model", export_models["llama"], "--n-samples", 2, "--seq-len", 32, "--remove", 2,
        "--no-verify", "--heal", "--heal-steps", 2, "--heal-samples", 2, "--out", out, "--quiet")])
    assert result.exit_code == 0, result.output
    healed = PruningManifest.read(out).heal
    assert healed.text == "self+python-docs" and healed.windows == 4 and healed.steps == 2


def test_block_heal_streams_one_block_at_a_time_as_it_heals_in_memory(tiny_models, calib_txt):
    """--heal-objective blocks: each healed block trained toward the dense state after it; a streamed
    model (blocks fetched one at a time) heals to the same weights as the model loaded whole, and the
    healed weights bring the pruned model nearer to dense on held-out text."""
    plan = HealPlan(steps=30, samples=16, seq_len=64, source=str(calib_txt), learning_rate=2e-3, precision=HealPrecision.fp32,
                    objective=HealObjective.blocks)
    healed = {}
    for execution in (Execution.in_memory, Execution.streamed):
        loaded = load_model(str(tiny_models["llama"]), execution=execution)
        result = prune(loaded, Plan(remove=3, calibration=CalibrationSpec(str(calib_txt), 8, 64)))
        healed[execution] = heal(loaded, result.kept, result.removed, result.compensation, plan)
        info = healed[execution].info
        assert info.objective == "blocks"
        assert info.blocks == healed_blocks(result.kept, result.removed) and set(info.block_loss) == set(info.blocks)
        assert all(last < first and steps == 30 for first, last, steps in info.block_loss.values()), info.block_loss
        if execution is Execution.in_memory:
            before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
            again = heal(loaded, result.kept, result.removed, result.compensation, plan)
            for name, p in loaded.model.named_parameters():  # nothing of the heal stays in the loaded model
                assert torch.equal(p, before[name]), name
            assert not any("lora" in n for n, _ in loaded.model.named_parameters())
            for name, w in again.weights.items():  # healed again from the model as it was: the same weights
                torch.testing.assert_close(w, healed[execution].weights[name])
            # Reach 2: the kept block two before the first cut has its dense input and output: nothing to
            # heal, so it is not trained; every block that is had something to learn.
            wide = heal(loaded, result.kept, result.removed, result.compensation, plan.model_copy(update={"reach": 2, "steps": 2}))
            first_cut = min(result.removed)
            assert first_cut - 2 in result.kept and first_cut - 2 not in wide.info.blocks, (result.removed, wide.info.blocks)
            assert set(wide.info.blocks) >= set(info.blocks) and all(first > 0 for first, _, _ in wide.info.block_loss.values())
    ours, theirs = healed[Execution.in_memory].weights, healed[Execution.streamed].weights
    trained = [m for m, _ in loaded.spec.heal_modules] + [n for n, _ in loaded.spec.heal_norms]  # a block's own norms too
    assert set(ours) == set(theirs) == {f"model.layers.{b}.{m}.weight" for b in healed[Execution.in_memory].info.blocks
                                        for m in trained}
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-5, msg=name)
    # Held-out text, measured through the streamed runner with the healed weights in place.
    ids = loaded.tokenizer(WIKI_TEST.read_text(encoding="utf-8")[:20000], return_tensors="pt").input_ids[0]
    windows = strided_windows(ids, 64, max_windows=8)
    plain = kl_to_dense(loaded, result.removed, result.compensation, windows)
    rest = fold_healed(result.compensation, theirs, loaded.spec)
    final, dense = final_states(loaded.runner, windows.ids, removal_runs(result.removed, result.compensation), rewritten=rest)
    after = evaluate(loaded.runner, final, windows, (loaded.runner, dense)).kl
    assert after < plain, (plain, after)


def loaded_block(name: str):
    """(block, name inside it) of a Llama parameter name; None outside the blocks."""
    if not name.startswith("model.layers."):
        return None
    block, rest = name.removeprefix("model.layers.").split(".", 1)
    return int(block), rest


@pytest.mark.slow  # a whole streamed build --heal; block healing streamed: test_block_heal_streams_one_block_at_a_time_as_it_heals_in_memory: make test-slow
def test_build_heal_streamed_writes_block_healed_weights(export_models, calib_txt, tmp_path):
    out = tmp_path / "out"
    args = ["build", "--target", "gguf", "--model", export_models["llama"], "--calib", calib_txt, "--n-samples", 4,
            "--seq-len", 64, "--remove", 2, "--heal", "--heal-steps", 4, "--heal-samples", 8, "--streamed", "--gguf-type", "q8_0",
            "--quiet"]
    # Self-generated heal text needs the whole model (generation): refused before anything loads.
    result = runner.invoke(app, [str(a) for a in (*args, "--heal-text", "self", "--out", out)])
    assert result.exit_code == 2 and "--heal-text self" in result.output and "in memory" in result.output, result.output
    assert "--heal-text FILE|wikitext2" in result.output, result.output
    result = runner.invoke(app, [str(a) for a in (*args, "--heal-objective", "logits", "--out", out)])
    assert result.exit_code == 2 and "--heal-objective logits" in result.output, result.output
    # Block-local healing on self-generated text raised held-out perplexity when measured: refused.
    result = runner.invoke(app, [str(a) for a in (*args, "--in-memory", "--heal-objective", "blocks", "--heal-text", "self", "--out", out)])
    assert result.exit_code == 2 and "--heal-objective blocks on self-generated heal text" in result.output, result.output
    assert not out.exists()
    text = tmp_path / "eval.txt"
    text.write_text(WIKI_TEST.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    result = runner.invoke(app, [str(a) for a in (*args, "--eval", text, "--eval-windows", 2, "--keep-hf", "--out", out)])
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    assert manifest.execution == "streamed" and manifest.heal.objective == "blocks" and manifest.heal.steps == 4 * len(manifest.heal.blocks)
    # Every step of every healed block trains on 4 of the 16 heal windows (8 of the calibration
    # file, 8 of Python's documentation; 256 tokens each: heal windows have their own length).
    assert (manifest.heal.windows, manifest.heal.seq_len) == (16, 256) and manifest.heal.tokens == manifest.heal.steps * 4 * 256
    assert manifest.heal.heldout_after == manifest.quality.pruned_ppl
    assert "each block's output distilled toward the dense state after it" in (out / "README.md").read_text()
    # What ships holds the healed weights: the checkpoint's differ from the dense model's exactly in the healed blocks.
    dense = safetensors_of(export_models["llama"])
    position = {old: new for new, old in enumerate(manifest.kept)}
    ours = safetensors_of(out / "hf")
    for name, value in ours.items():
        at = loaded_block(name)
        if at is None:
            continue
        new, rest = at
        original = dense[f"model.layers.{manifest.kept[new]}.{rest}"]
        healed = manifest.kept[new] in manifest.heal.blocks and rest.removesuffix(".weight") in manifest.heal.modules + manifest.heal.norms
        assert torch.equal(value, original) != healed, name
    # The GGUF (converted from that checkpoint) holds the healed weights too, up to Q8_0 rounding.
    [e] = manifest.exports
    tensors = {t.name: t for t in open_gguf(out / e.file).tensors}
    b = manifest.heal.blocks[-1]
    t = tensors[f"blk.{position[b]}.ffn_up.weight"]
    expected = ours[f"model.layers.{position[b]}.mlp.up_proj.weight"].numpy()
    np.testing.assert_allclose(gguf.quants.dequantize(t.data, t.tensor_type), expected, atol=np.abs(expected).max() / 127)


def safetensors_of(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_heal_command_heals_a_pruned_checkpoint_as_build_heal_does(export_models, calib_txt, tmp_path):
    model = export_models["llama"]
    common = ["--model", model, "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--remove", 2, "--quiet"]
    heal_txt = tmp_path / "heal.txt"
    heal_txt.write_text(WIKI_TEST.read_text(encoding="utf-8")[20000:40000], encoding="utf-8")
    heal_budget = ["--heal-steps", 3, "--heal-samples", 4, "--heal-text", f"{heal_txt}+python-docs"]
    pruned, healed, built = tmp_path / "pruned", tmp_path / "healed", tmp_path / "built"
    assert runner.invoke(app, [str(a) for a in ("prune", *common, "--out", pruned)]).exit_code == 0
    text = tmp_path / "eval.txt"
    text.write_text(WIKI_TEST.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    result = runner.invoke(app, [str(a) for a in (
        "heal", "--model", pruned, "--out", healed, *heal_budget, "--eval", text, "--eval-windows", 2, "--quiet")])
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(healed)
    assert manifest.heal.steps == 3 and manifest.removed == PruningManifest.read(pruned).removed
    assert manifest.heal.text == f"{heal_txt}+python-docs" and manifest.heal.windows == 8  # 4 of each source
    # Evaluating on a text the model was healed on is flagged, as on its calibration text.
    assert "heal text" in calibration_overlap(resolve_source(str(healed)), str(heal_txt))
    assert calibration_overlap(resolve_source(str(healed)), str(text)) is None
    assert manifest.heal.heldout_after is not None and manifest.quality.pruned_ppl == manifest.heal.heldout_after
    # The same decision healed inside `build --heal` (its checkpoint kept): the same weights.
    result = runner.invoke(app, [str(a) for a in (
        "build", "--target", "gguf", *common, "--heal", *heal_budget, "--keep-hf", "--out", built)])
    assert result.exit_code == 0, result.output
    ours, theirs, before = safetensors_of(healed), safetensors_of(built / "hf"), safetensors_of(pruned)
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    changed = {n for n in ours if not torch.equal(ours[n], before[n])}
    position = {old: new for new, old in enumerate(manifest.kept)}
    assert changed == ({f"model.layers.{position[b]}.{m}.weight" for b in manifest.heal.blocks for m in manifest.heal.modules}
                       | {f"model.layers.{position[b]}.{n}.weight" for b in manifest.kept for n in manifest.heal.norms})


def test_heal_command_heals_a_streamed_reference_block_by_block(export_models, calib_txt, tmp_path):
    """`heal --streamed`: the pruned checkpoint's weights read back against the source one tensor at a
    time, healed block by block: the same weights as the in-memory `--heal-objective blocks`."""
    model = export_models["llama"]
    pruned = tmp_path / "pruned"
    args = ("prune", "--model", model, "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--remove", 2, "--out", pruned, "--quiet")
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    heal_args = ["heal", "--model", pruned, "--heal-steps", 3, "--heal-samples", 4, "--heal-precision", "fp32", "--quiet"]
    streamed, whole = tmp_path / "streamed", tmp_path / "whole"
    result = runner.invoke(app, [str(a) for a in (*heal_args, "--streamed", "--out", streamed)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [str(a) for a in (*heal_args, "--in-memory", "--heal-objective", "blocks", "--out", whole)])
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(streamed)
    assert manifest.heal.objective == "blocks"  # auto, on the streamed model
    # The heal's own execution is recorded beside the prune's (which loaded the model in memory).
    assert (manifest.execution, manifest.heal.execution, manifest.heal.device) == ("in-memory", "streamed", "cpu")
    assert PruningManifest.read(whole).heal.execution == "in-memory"
    assert manifest.heal.text == f"{calib_txt}+python-docs"  # the pruned checkpoint's recorded calibration text, and the docs
    ours, theirs, before = safetensors_of(streamed), safetensors_of(whole), safetensors_of(pruned)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-5, msg=name)
    position = {old: new for new, old in enumerate(manifest.kept)}
    changed = {n for n in ours if not torch.equal(ours[n], before[n])}
    assert changed == {f"model.layers.{position[b]}.{m}.weight" for b in manifest.heal.blocks
                       for m in manifest.heal.modules + manifest.heal.norms}


def test_heal_command_refuses_bad_input_before_loading(tiny_models, calib_txt, tmp_path):
    pruned = tmp_path / "pruned"
    args = ("prune", "--model", tiny_models["llama"], "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--remove", 2,
            "--no-verify", "--out", pruned, "--quiet")
    assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    cases = {
        "not a pruned checkpoint": ("--model", tiny_models["llama"]),
        "model, not qwen3": ("--model", pruned, "--reference", tiny_models["qwen3"]),
        "--out is the pruned folder": ("--model", pruned, "--out", pruned, "--force"),
        "--heal-text file": ("--model", pruned, "--heal-text", tmp_path / "missing.txt"),
        "missing2.txt does not exist": ("--model", pruned, "--heal-text", f"python-docs+{tmp_path / 'missing2.txt'}"),
        "has an empty part": ("--model", pruned, "--heal-text", "python-docs+"),
    }
    partial = tmp_path / "partial"  # the decision is readable, the rest of pruning.json is not
    shutil.copytree(pruned, partial)
    recorded = json.loads((partial / "pruning.json").read_text())
    (partial / "pruning.json").write_text(json.dumps({k: recorded[k] for k in ("removed", "architecture", "blocks_before", "shapes")}))
    cases["is not a pruning.json of mi-prun-edge"] = ("--model", partial)
    for message, extra in cases.items():
        out = tmp_path / "out"
        result = runner.invoke(app, [str(a) for a in ("heal", "--out", out, *extra)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not out.exists()
