"""The headline command on the real default model: `build --target gguf` prunes the Q4_1 GGUF in place,
and llama.cpp runs the result like transformers runs the same blocks removed."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from mi_prun.runtimes import llamacpp
from mi_prun.runtimes.gguf_prune import open_gguf
from mi_prun.runtimes.parity import compare_logits, transformers_logits
from mi_prun.cli import app
from mi_prun.load import default_model_path, load_model
from mi_prun.manifest import PruningManifest

from .conftest import WIKI_TEST

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def headline_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("headline") / "smollm2-gguf"
    # exactly the README's main job, plus --keep-hf for the export checks below
    result = runner.invoke(app, ["build", "--target", "gguf", "--keep-hf", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out, PruningManifest.read(out)


@pytest.fixture(scope="module")
def dense_default():
    return load_model()


def wiki_tokens(tokenizer, n=256):
    return tokenizer(WIKI_TEST.read_text(encoding="utf-8")[:5000], add_special_tokens=False)["input_ids"][:n]


def repacked(out):
    """The repacked checkpoint the build kept in hf/ (blocks removed, compensation folded in)."""
    return AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()


def test_headline_build_prunes_the_q4_1_gguf_in_place(headline_build, dense_default, record_property):
    out, manifest = headline_build
    [e] = manifest.exports
    assert manifest.blocks_before == 30 and len(manifest.removed) == 4 and manifest.calibration.source == "self"
    # the blocks the main job removed before the plan/pipeline redesign (main at fd305a7)
    assert manifest.removed == [12, 13, 14, 15]
    assert e.format_type == "q4_1" and e.check["block_count"] == 26 and e.check["llama_cpp_layers"] == 26
    assert (out / "README.md").read_text().count(e.file) >= 2
    src = {t.name: t for t in open_gguf(default_model_path()).tensors}
    dst = {t.name: t for t in open_gguf(out / e.file).tensors}
    assert len(src) - len(dst) == 4 * 9  # nine tensors per Llama block
    kept = manifest.kept
    folded = {r.folded_into for r in manifest.compensation.runs if r.folded_into is not None}
    assert manifest.compensation.enabled and folded
    # compensated tensors are written in Q8_0 (auto: the source's 4-bit type would round the fitted map again)
    assert e.check["tensors_replaced"] == {f"blk.{p}.ffn_down.weight": "Q8_0" for p in folded}
    model = repacked(out)
    for name, t in dst.items():
        original = name
        if name.startswith("blk."):
            _, new, rest = name.split(".", 2)
            original = f"blk.{kept[int(new)]}.{rest}"
        if original in e.check["tensors_replaced"]:
            # the compensated weight, encoded in Q8_0: within one quantization step of the checkpoint's
            # (Q8_0: 255 levels per 32-weight block), and written into the model below
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            weight = model.model.layers[int(new)].mlp.down_proj.weight
            step = (np.abs(weight.detach().numpy().reshape(-1, 32)).max(axis=1) / 127).max()
            np.testing.assert_allclose(values, weight.detach().numpy(), atol=step)
            with torch.no_grad():
                weight.copy_(torch.from_numpy(values))
        else:
            assert src[original].tensor_type == t.tensor_type, name
            assert np.array_equal(src[original].data, t.data), name

    loaded = dense_default
    tokens = wiki_tokens(loaded.tokenizer)
    dense_parity = compare_logits(transformers_logits(loaded.model, tokens), llamacpp.logits(default_model_path(), tokens))
    reference = transformers_logits(model, tokens)
    parity = compare_logits(reference, llamacpp.logits(out / e.file, tokens))
    # llama.cpp's Q4_1 kernels quantize activations to 8 bits, transformers runs the dequantized
    # weights in fp32: even the unpruned file agrees on the top-1 token only ~95% of the time. To
    # check the pruned file itself at >= 99%, llama.cpp dequantizes it to F32 (exact) and runs that.
    exact = out.parent / "pruned-dequantized.f32.gguf"
    llamacpp.quantize(out / e.file, exact, "LLAMA_FTYPE_ALL_F32")
    exact_parity = compare_logits(reference, llamacpp.logits(exact, tokens))
    exact.unlink()
    record = {"removed": manifest.removed, "q4_1_dense": dense_parity.__dict__, "q4_1_pruned": parity.__dict__,
              "pruned_dequantized_f32": exact_parity.__dict__}
    record_property("gguf_in_place", json.dumps(record))
    print("\nin-place GGUF parity:", json.dumps(record))
    assert exact_parity.top1 >= 0.99 and exact_parity.mean_kl < 1e-3, exact_parity
    # Running quantized, pruning adds little to the kernels' own disagreement.
    assert parity.top1 >= dense_parity.top1 - 0.05 and parity.mean_kl < 3 * dense_parity.mean_kl, (parity, dense_parity)


def test_pruned_checkpoint_exports_f16_and_q8_0(headline_build, dense_default, tmp_path, record_property):
    out, manifest = headline_build
    loaded = dense_default
    tokens = wiki_tokens(loaded.tokenizer)
    reference = transformers_logits(repacked(out), tokens)
    record = {}
    for gtype in ("f16", "q8_0"):
        target = tmp_path / gtype
        result = runner.invoke(app, ["export", "--target", "gguf", "--model", str(out / "hf"), "--gguf-type", gtype, "--out", str(target), "--quiet"])
        assert result.exit_code == 0, result.output
        info = json.loads((target / "export.json").read_text())
        assert info["check"]["block_count"] == 26
        assert llamacpp.tokenize(target / info["file"], loaded.tokenizer.decode(tokens))[:200] == tokens[:200]
        parity = compare_logits(reference, llamacpp.logits(target / info["file"], tokens))
        record[gtype] = {**parity.__dict__, "bytes": info["bytes"]}
    record_property("gguf_exports", json.dumps(record))
    print("\nexport parity:", json.dumps(record))
    assert record["f16"]["top1"] >= 0.99 and record["f16"]["mean_kl"] < 0.01
    # q8_0 is recorded (issue: "record the KL"); llama.cpp also quantizes activations to 8 bits, so
    # top-1 agreement sits below f16's (measured: 94.5%, KL 0.0058 nats): bound it loosely.
    assert record["q8_0"]["top1"] >= 0.9 and record["q8_0"]["mean_kl"] < 0.02


def test_headline_plan_replays_on_a_requantized_sibling_at_f16(headline_build, tmp_path, record_property):
    """Choose on the shipped Q4_1 file, apply to another quantization of the same model (Q8_0), with
    --gguf-type f16: the same runs are fitted again on the sibling, the compensated tensors are
    rounded once (to f16), so llama.cpp runs the file as transformers runs the checkpoint the same
    build keeps. (One replay for both checks: each replay generates the calibration text again.)"""
    out, manifest = headline_build
    sibling = tmp_path / "SmolLM2-135M-Instruct.Q8_0.gguf"
    llamacpp.quantize(default_model_path(), sibling, "LLAMA_FTYPE_MOSTLY_Q8_0")
    replayed = tmp_path / "replayed"
    result = runner.invoke(app, ["build", "--plan", str(out / "pruning.json"), "--model", str(sibling), "--gguf-type", "f16",
                                 "--keep-hf", "--out", str(replayed), "--quiet"])
    assert result.exit_code == 0, result.output
    again = PruningManifest.read(replayed)
    [e] = again.exports
    assert again.removed == manifest.removed and again.selection.replayed_from
    assert e.format_type == "f16" and e.check["llama_cpp_layers"] == 26
    assert [(r.first, r.last, r.folded_into) for r in again.compensation.runs] == \
        [(r.first, r.last, r.folded_into) for r in manifest.compensation.runs]
    hf = repacked(replayed)
    tokens = wiki_tokens(AutoTokenizer.from_pretrained(replayed / "hf"), 512)
    parity = compare_logits(transformers_logits(hf, tokens), llamacpp.logits(replayed / e.file, tokens))
    record_property("parity", parity)
    assert parity.top1 >= 0.99, parity


def test_streamed_default_model_equals_in_memory(tmp_path):
    """The default model held one block at a time (tensors read from the Q4_1 GGUF and dequantized
    per block) decides, compensates and scores like the model loaded whole; the streamed build's
    GGUF runs in llama.cpp with the new block count."""
    from mi_prun.calibration import CalibrationSpec
    from mi_prun.evaluate import perplexity
    from mi_prun.pipeline import prune
    from mi_prun.plan import Execution, Plan

    from .conftest import WIKI_VALID

    plan = Plan(remove=4, calibration=CalibrationSpec(str(WIKI_VALID), n_samples=4, seq_len=128))
    results, ppl = {}, {}
    for execution in (Execution.in_memory, Execution.streamed):
        loaded = load_model(execution=execution)
        r = results[execution] = prune(loaded, plan)
        ids = loaded.tokenizer(WIKI_TEST.read_text(encoding="utf-8")[:40000], add_special_tokens=False, return_tensors="pt")["input_ids"]
        ppl[execution] = perplexity(loaded.runner, ids[0, : 4 * 256].view(4, 256), r.compensation).ppl
        del loaded
    a, b = results[Execution.in_memory], results[Execution.streamed]
    assert a.removed == b.removed
    for ca, cb in zip(a.compensation, b.compensation, strict=True):
        if ca.weight is not None:
            assert float((ca.weight - cb.weight).norm() / ca.weight.norm()) < 1e-4
    assert ppl[Execution.streamed] == pytest.approx(ppl[Execution.in_memory], rel=1e-3)

    out = tmp_path / "streamed"
    result = runner.invoke(app, ["build", "--target", "gguf", "--streamed", "--calib", str(WIKI_VALID), "--n-samples", "4",
                                 "--seq-len", "128", "--remove", "4", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    assert manifest.execution == "streamed" and manifest.removed == a.removed
    assert manifest.exports[0].check["llama_cpp_layers"] == 26
