"""GGUF export and in-place GGUF pruning, checked in llama.cpp itself (llama-cpp-python)."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mi_prun.runtimes import llamacpp
from mi_prun.runtimes.formats import GGUFType
from mi_prun.runtimes.gguf_export import check_gguf, export_gguf, export_warnings
from mi_prun.runtimes.gguf_prune import open_gguf, prune_gguf
from mi_prun.runtimes.parity import compare_logits, transformers_logits
from mi_prun.archs import spec_for
from mi_prun.blockset import apply_keep, keep_indices
from mi_prun.cli import app
from mi_prun.errors import UserError
from mi_prun.manifest import PruningManifest
from tests.conftest import SPM_FOR_CONVERTER, TINY_BLOCKS, WIKI_TEST, archs_fast_first, build_export_model

REMOVED = [1, 4]  # an odd index shifts Gemma 3's sliding/full pattern
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def wiki_tokens(tokenizer, n=256):
    text = WIKI_TEST.read_text(encoding="utf-8")[:4000]
    return text, tokenizer(text, add_special_tokens=False)["input_ids"][:n]


def pruned_folder(model_dir, tmp_path, removed=REMOVED):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    spec = spec_for(model.config.model_type)
    apply_keep(model, spec, keep_indices(TINY_BLOCKS, removed))
    out = tmp_path / "pruned_hf"
    model.save_pretrained(out)
    for f in model_dir.iterdir():  # the tokenizer files as they are
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):  # incl. tokenizer.model
            shutil.copy2(f, out / f.name)
    return out, model.eval()


@pytest.mark.parametrize("arch", archs_fast_first(["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]))
def test_pruned_export_f32_matches_transformers_in_llama_cpp(arch, export_models, smol_tokenizer, tmp_path):
    folder, model = pruned_folder(export_models[arch], tmp_path)
    out = tmp_path / "model.f32.gguf"
    export = export_gguf(folder, out, GGUFType.f32, tmp_path)
    check = check_gguf(out, TINY_BLOCKS - len(REMOVED))
    assert check.llama_cpp_layers == TINY_BLOCKS - 2 and check.tensor_types.keys() == {"F32"}
    reader = open_gguf(out)
    # tokenizer and chat template travel with the file
    assert reader.get_field("tokenizer.ggml.tokens") is not None and reader.get_field("tokenizer.chat_template") is not None
    if arch == "gemma3_text":
        # the sliced per-layer pattern: kept blocks 0,2,3,5,6,7 of [s,f,s,f,s,f,s,f]
        pattern = reader.get_field("gemma3.attention.sliding_window_pattern").contents()
        assert pattern == [True, True, False, False, True, False]
        assert export.set_keys == ["gemma3.attention.sliding_window_pattern"]
    text, tokens = wiki_tokens(smol_tokenizer)
    if arch not in SPM_FOR_CONVERTER:  # (those carry a stand-in vocabulary: see conftest)
        assert llamacpp.tokenize(out, text)[: len(tokens)] == tokens
    parity = compare_logits(transformers_logits(model, tokens), llamacpp.logits(out, tokens))
    assert parity.top1 >= 0.99 and parity.mean_kl < 1e-3, parity


@pytest.mark.slow  # export from a folder: test_build_cli_from_hf_folder_and_export (q8_0): make test-slow
def test_f16_and_q8_0_exports(export_models, smol_tokenizer, tmp_path, record_property):
    folder, model = pruned_folder(export_models["llama"], tmp_path)
    _, tokens = wiki_tokens(smol_tokenizer)
    ref = transformers_logits(model, tokens)
    results = {}
    for gtype in (GGUFType.f16, GGUFType.q8_0, GGUFType.q4_0):
        out = tmp_path / f"model.{gtype.value}.gguf"
        export_gguf(folder, out, gtype, tmp_path)
        check = check_gguf(out, TINY_BLOCKS - 2)
        results[gtype.value] = (compare_logits(ref, llamacpp.logits(out, tokens)), check)
    f16, q8, q4 = (results[k][0] for k in ("f16", "q8_0", "q4_0"))
    assert f16.top1 >= 0.99 and f16.mean_kl < 1e-3, f16
    assert "Q8_0" in results["q8_0"][1].tensor_types and "Q4_0" in results["q4_0"][1].tensor_types
    assert results["q8_0"][1].file_type == 7 and results["q4_0"][1].file_type == 2
    # Quantization costs a little, and 4 bits cost more than 8.
    assert 0 < q8.mean_kl < q4.mean_kl
    record_property("kl", {k: v[0].mean_kl for k, v in results.items()})
    print({k: (round(v[0].mean_kl, 6), round(v[0].top1, 4)) for k, v in results.items()})


def test_in_place_pruning_slices_per_layer_arrays_and_keeps_bytes(export_models, smol_tokenizer, tmp_path):
    # A Gemma 3 GGUF has a per-layer array (sliding_window_pattern); prune it in place.
    dense = tmp_path / "dense.f32.gguf"
    export_gguf(export_models["gemma3_text"], dense, GGUFType.f32, tmp_path)
    assert open_gguf(dense).get_field("gemma3.attention.sliding_window_pattern").contents() == [True, False] * 4
    out = tmp_path / "pruned.gguf"
    report = prune_gguf(dense, out, REMOVED)
    assert report.sliced_keys == ["gemma3.attention.sliding_window_pattern"] and report.kept == [0, 2, 3, 5, 6, 7]
    a, b = open_gguf(dense), open_gguf(out)
    assert b.get_field("gemma3.block_count").contents() == 6
    assert b.get_field("gemma3.attention.sliding_window_pattern").contents() == [True, True, False, False, True, False]
    old = {t.name: t for t in a.tensors}
    for t in b.tensors:
        name = t.name
        if name.startswith("blk."):
            _, new, rest = name.split(".", 2)
            name = f"blk.{report.kept[int(new)]}.{rest}"
        assert old[name].tensor_type == t.tensor_type and np.array_equal(old[name].data, t.data), t.name
    # llama.cpp runs it like transformers runs the same blocks removed.
    _, model = pruned_folder(export_models["gemma3_text"], tmp_path)
    _, tokens = wiki_tokens(smol_tokenizer, 200)
    parity = compare_logits(transformers_logits(model, tokens), llamacpp.logits(out, tokens))
    assert parity.top1 >= 0.99 and parity.mean_kl < 1e-3, parity
    check_gguf(out, 6)


def test_bad_gguf_inputs(tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 40)
    with pytest.raises(UserError, match="not a readable GGUF"):
        prune_gguf(truncated, tmp_path / "o.gguf", [0])
    with pytest.raises(UserError, match="does not exist"):
        prune_gguf(tmp_path / "missing.gguf", tmp_path / "o.gguf", [0])
    # A well-formed GGUF of an architecture the tool does not prune.
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_block_count(2)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(4, dtype=np.float32))
    w.add_tensor("blk.1.attn_norm.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UserError, match="'gpt2' is not supported"):
        prune_gguf(other, tmp_path / "o.gguf", [0], supported_archs=["llama", "qwen2"])
    with pytest.raises(UserError, match="cannot remove blocks"):
        prune_gguf(other, tmp_path / "o.gguf", [0, 1])
    result = invoke("build", "--target", "gguf", "--model", truncated, "--remove", 1, "--out", tmp_path / "b", "--quiet")
    assert result.exit_code == 2 and "GGUF" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_mistral_window_warning():
    spec = spec_for("mistral")
    assert export_warnings(spec, {"sliding_window": 4096, "max_position_embeddings": 32768})
    assert not export_warnings(spec, {"sliding_window": None, "max_position_embeddings": 32768})


def test_build_cli_from_hf_folder_and_export(export_models, calib_txt, tmp_path):
    out = tmp_path / "build"
    result = invoke("build", "--target", "gguf", "--model", export_models["gemma3_text"], "--calib", calib_txt,
                    "--n-samples", 4, "--seq-len", 64, "--remove", 2, "--gguf-type", "f16", "--keep-hf",
                    "--eval", calib_txt.parent / "calib.txt", "--eval-windows", 2, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    [e] = manifest.exports
    assert e.format_type == "f16" and (out / e.file).is_file() and e.check["llama_cpp_layers"] == 6
    assert (out / "hf" / "config.json").is_file() and json.loads((out / "hf" / "config.json").read_text())["num_hidden_layers"] == 6
    card = (out / "README.md").read_text()
    assert e.file in card and "llama-cli" in card and str(manifest.removed) in card and "pruned perplexity" in card
    assert manifest.quality.tokens > 0 and 0 < manifest.quality.top1_agreement <= 1
    # the dense model, exported as is, for comparison in the same runtime
    dense = tmp_path / "dense"
    result = invoke("export", "--target", "gguf", "--model", export_models["gemma3_text"], "--gguf-type", "q8_0", "--out", dense, "--quiet")
    assert result.exit_code == 0, result.output
    info = json.loads((dense / "export.json").read_text())
    assert info["check"]["block_count"] == TINY_BLOCKS and info["format_type"] == "q8_0"
    for bad, message in [(["--target", "tflite"], "Invalid value for '--target'"), (["--gguf-type", "q2_k"], "Invalid value for '--gguf-type'")]:
        result = invoke("build", "--model", export_models["gemma3_text"], "--out", tmp_path / "x", "--quiet", *bad)
        assert result.exit_code == 2 and message in result.output


def test_build_cli_prunes_a_gguf_in_place(tiny_q8_0_gguf, calib_txt, tmp_path):
    src = tiny_q8_0_gguf
    out = tmp_path / "build"
    result = invoke("build", "--target", "gguf", "--model", src, "--calib", calib_txt, "--n-samples", 4,
                    "--seq-len", 64, "--remove", 3, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    [e] = manifest.exports
    assert e.format_type == "q8_0" and "in-place" in e.route and e.check["block_count"] == 5
    assert not (out / "hf").exists()
    before = {t.name: t for t in open_gguf(src).tensors}
    after = {t.name: t for t in open_gguf(out / e.file).tensors}
    assert np.array_equal(before["token_embd.weight"].data, after["token_embd.weight"].data)
    assert before["token_embd.weight"].tensor_type == after["token_embd.weight"].tensor_type


@pytest.mark.slow  # a second build, re-encoded by llama.cpp: make test-slow
def test_build_cli_reencodes_a_gguf_to_another_type_and_says_it_costs_quality(tiny_q8_0_gguf, calib_txt, tmp_path):
    src = tiny_q8_0_gguf
    out2 = tmp_path / "build-f16"
    result = invoke("build", "--target", "gguf", "--model", src, "--calib", calib_txt, "--n-samples", 4,
                    "--seq-len", 64, "--remove", 3, "--gguf-type", "f16", "--out", out2, "--quiet")
    assert result.exit_code == 0, result.output
    [e2] = PruningManifest.read(out2).exports
    assert e2.format_type == "f16" and e2.check["block_count"] == 5 and e2.warnings and "quantize" in e2.route


@pytest.mark.slow  # overlaps test_build_cli_prunes_a_gguf_in_place and the 4-bit compensated-type test: make test-slow
def test_in_place_build_writes_compensated_weights(tiny_q8_0_gguf, calib_txt, smol_tokenizer, tmp_path):
    """Compensation rewrites one ffn_down per removed run: re-encoded in the file's own type, equal
    to the repacked checkpoint's weight up to that type's rounding; every other tensor keeps its bytes."""
    src = tiny_q8_0_gguf
    out = tmp_path / "build"
    result = invoke("build", "--target", "gguf", "--model", src, "--calib", calib_txt, "--n-samples", 4,
                    "--seq-len", 64, "--remove", 3, "--keep-hf", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    [e] = manifest.exports
    folded = [r.folded_into for r in manifest.compensation.runs if r.folded_into is not None]
    assert folded, manifest.compensation
    assert e.check["tensors_replaced"] == {f"blk.{p}.ffn_down.weight": "Q8_0" for p in folded}
    assert "folded into `mlp.down_proj.weight`" in (out / "README.md").read_text()
    before = {t.name: t for t in open_gguf(src).tensors}
    after = {t.name: t for t in open_gguf(out / e.file).tensors}
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    for new, old in enumerate(manifest.kept):
        for t in after.values():
            if not t.name.startswith(f"blk.{new}."):
                continue
            original = before[t.name.replace(f"blk.{new}.", f"blk.{old}.", 1)]
            if old in folded and t.name.endswith("ffn_down.weight"):
                values = gguf.quants.dequantize(t.data, t.tensor_type)
                expected = hf.model.layers[new].mlp.down_proj.weight.detach().numpy()
                step = np.abs(expected).max() / 127
                np.testing.assert_allclose(values, expected, atol=step)
                assert not np.array_equal(t.data, original.data)
            else:
                assert np.array_equal(t.data, original.data), t.name
    # llama.cpp runs the file like transformers runs the repacked checkpoint (q8_0 kernels: near, not exact)
    _, tokens = wiki_tokens(smol_tokenizer, 200)
    parity = compare_logits(transformers_logits(hf.eval(), tokens), llamacpp.logits(out / e.file, tokens))
    assert parity.top1 >= 0.9, parity


@pytest.mark.slow  # the real Gemma 3 270M is pruned in place in test_real_gemma3 (and healed in place in test_heal): make test-slow
def test_in_place_gemma3_writes_its_sliding_window_pattern(smol_tokenizer, tmp_path):
    """A Gemma 3 GGUF as llama.cpp's converter writes it has no per-layer pattern (llama.cpp then
    assumes every 6th layer global); pruned in place, it must carry the kept blocks' own pattern."""
    from mi_prun.runtimes.gguf_export import convert

    # Shaped like the real Gemma 3 (every 6th layer global, head_dim = query_pre_attn_scalar = 256),
    # so that its converter-made GGUF is right without the array, as the real model's is, and
    # transformers reads it back with the scale llama.cpp uses.
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(TINY_BLOCKS)]
    folder = build_export_model("gemma3_text", tmp_path / "gemma", smol_tokenizer, layer_types=pattern, head_dim=256,
                                query_pre_attn_scalar=256)
    src = tmp_path / "gemma.f32.gguf"
    convert(folder, src, "f32")
    key = "gemma3.attention.sliding_window_pattern"
    assert open_gguf(src).get_field(key) is None
    # A decision (replayed from a plan file) that moves the global layer 5 down to index 2.
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"removed": [1, 2, 3], "architecture": "gemma3_text", "blocks_before": TINY_BLOCKS}))
    out = tmp_path / "build"
    result = invoke("build", "--model", src, "--plan", plan, "--keep-hf", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    [e] = manifest.exports
    assert manifest.kept == [0, 4, 5, 6, 7]
    # Without the array, llama.cpp (and transformers reading the file) take every 6th layer as global:
    # that is the source's pattern, and the pruned file must say it for the blocks it kept.
    implicit = [(i + 1) % 6 != 0 for i in range(TINY_BLOCKS)]
    written = list(open_gguf(out / e.file).get_field(key).contents())
    assert written == [implicit[i] for i in manifest.kept] == [True, True, False, True, True]
    # llama.cpp runs it like transformers runs the same pruned checkpoint, past the 16-token window
    _, tokens = wiki_tokens(smol_tokenizer, 200)
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    parity = compare_logits(transformers_logits(hf, tokens), llamacpp.logits(out / e.file, tokens))
    assert parity.top1 >= 0.99 and parity.mean_kl < 1e-3, parity
    # The run 1..3 is compensated by a per-channel scale in block 0's post-feed-forward norm: the
    # GGUF holds the scale itself (1 + w), the checkpoint Gemma's w.
    assert manifest.compensation.form == "scale" and [r.folded_into for r in manifest.compensation.runs] == [0]
    assert e.check["tensors_replaced"] == {"blk.0.post_ffw_norm.weight": "F32"}
    written = {t.name: t for t in open_gguf(out / e.file).tensors}["blk.0.post_ffw_norm.weight"]
    original = {t.name: t for t in open_gguf(src).tensors}["blk.0.post_ffw_norm.weight"]
    w = hf.model.layers[0].post_feedforward_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(written.data), w + 1.0, rtol=1e-6)
    assert not np.allclose(np.asarray(written.data), np.asarray(original.data))


@pytest.mark.slow  # compensated types, fast: test_compensated_tensors_of_a_4_bit_source_are_q8_0_by_default: make test-slow
def test_gguf_type_rounds_compensated_tensors_once(export_models, calib_txt, tmp_path):
    """--gguf-type f16 on a q4_0 source: the compensated ffn_down reaches the file through one
    rounding (to f16), so it equals the --keep-hf checkpoint's weight to f16 precision. (A decision
    replayed on another quantization of the model: test_real_gguf's requantized sibling.)"""
    src = tmp_path / "tiny.q4_0.gguf"
    export_gguf(export_models["llama"], src, GGUFType.q4_0, tmp_path)
    out = tmp_path / "build"
    common = ["--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--quiet"]
    result = invoke("build", "--model", src, "--remove", 3, "--gguf-type", "f16", "--keep-hf", "--out", out, *common)
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    [e] = manifest.exports
    folded = [r.folded_into for r in manifest.compensation.runs if r.folded_into is not None]
    assert folded and set(e.check["tensors_replaced"].values()) == {"F32"}
    tensors = {t.name: t for t in open_gguf(out / e.file).tensors}
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    for old in folded:
        new = manifest.kept.index(old)
        t = tensors[f"blk.{new}.ffn_down.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F16
        expected = hf.model.layers[new].mlp.down_proj.weight.detach().numpy()
        np.testing.assert_allclose(t.data.astype(np.float32), expected, rtol=1e-3, atol=1e-6)


def test_truncated_gguf_is_named_as_such(export_models, tmp_path):
    src = tmp_path / "tiny.f16.gguf"
    export_gguf(export_models["llama"], src, GGUFType.f16, tmp_path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    result = invoke("build", "--model", cut, "--remove", 1, "--out", tmp_path / "b")
    assert result.exit_code == 2 and f"{cut} is truncated" in result.output, result.output
    assert "loading" not in result.output and not (tmp_path / "b").exists()


@pytest.mark.slow  # a whole build for its messages: make test-slow
def test_quiet_silences_progress_on_a_gguf_source(export_models, calib_txt, tmp_path):
    """--quiet: no bars or messages on stderr, ours or the libraries' (a GGUF is read tensor by
    tensor by the tool itself: transformers' dequantization bar no longer appears either way)."""
    import subprocess
    import sys

    src = tmp_path / "tiny.f16.gguf"
    export_gguf(export_models["llama"], src, GGUFType.f16, tmp_path)
    base = [sys.executable, "-m", "mi_prun", "eval", "--model", str(src), "--data", str(calib_txt), "--max-windows", "1",
            "--seq-len", "64"]
    loud = subprocess.run(base, capture_output=True, text=True)
    quiet = subprocess.run(base + ["--quiet"], capture_output=True, text=True)
    assert loud.returncode == 0 and quiet.returncode == 0, quiet.stderr
    assert "loading" in loud.stderr and "in-memory" in loud.stderr  # progress without --quiet...
    assert "loading" not in quiet.stderr and "%|" not in quiet.stderr and "━" not in quiet.stderr  # ...and none with it


def test_compensated_tensors_of_a_4_bit_source_are_q8_0_by_default(export_models, calib_txt, tmp_path):
    """On a q4_0 source the rewritten ffn_down tensors are Q8_0 by default (--compensated-type auto;
    llama.cpp mixes types per tensor), every other tensor keeps its Q4_0 bytes, and the file runs."""
    src = tmp_path / "tiny.q4_0.gguf"
    export_gguf(export_models["llama"], src, GGUFType.q4_0, tmp_path)
    out = tmp_path / "build"
    result = invoke("build", "--model", src, "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--remove", 3,
                    "--keep-hf", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    [e] = manifest.exports
    folded = [r.folded_into for r in manifest.compensation.runs if r.folded_into is not None]
    assert folded and e.check["tensors_replaced"] == {f"blk.{p}.ffn_down.weight": "Q8_0" for p in folded}
    assert e.format_type == "q4_0" and e.check["llama_cpp_layers"] == TINY_BLOCKS - 3
    tensors = {t.name: t for t in open_gguf(out / e.file).tensors}
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    for old in folded:
        new = manifest.kept.index(old)
        t = tensors[f"blk.{new}.ffn_down.weight"]
        expected = hf.model.layers[new].mlp.down_proj.weight.detach().numpy()
        np.testing.assert_allclose(gguf.quants.dequantize(t.data, t.tensor_type), expected, atol=np.abs(expected).max() / 127)
    assert {t.tensor_type for n, t in tensors.items() if n.endswith("attn_q.weight")} == {gguf.GGMLQuantizationType.Q4_0}
