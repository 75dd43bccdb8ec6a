"""ONNX export through onnxruntime-genai's model builder, checked in onnxruntime and onnxruntime-genai."""

import json

import pytest
import torch
from typer.testing import CliRunner

from mi_prun.runtimes.formats import OnnxPrecision
from mi_prun.runtimes.onnx_export import OnnxSession, check_onnx, export_onnx, genai_greedy, onnx_perplexity
from mi_prun.runtimes.parity import compare_logits, transformers_logits
from mi_prun.cli import app
from mi_prun.manifest import PruningManifest
from tests.conftest import TINY_BLOCKS, archs_fast_first
from tests.test_gguf import REMOVED, pruned_folder, wiki_tokens

runner = CliRunner()


@pytest.mark.parametrize("arch", archs_fast_first(["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]))
def test_pruned_fp32_export_matches_transformers(arch, export_models, smol_tokenizer, tmp_path):
    folder, model = pruned_folder(export_models[arch], tmp_path)
    out = tmp_path / "onnx"
    export_onnx(folder, out, OnnxPrecision.fp32, tmp_path / "cache")
    check = check_onnx(out, TINY_BLOCKS - len(REMOVED))
    assert check.genai_loads and check.matmul_nbits == 0
    _, tokens = wiki_tokens(smol_tokenizer, 200)
    parity = compare_logits(transformers_logits(model, tokens), OnnxSession(out).logits(tokens))
    assert parity.top1 >= 0.99 and parity.mean_kl < 1e-4, parity
    # Greedy decoding with the KV cache, 32 tokens, exactly as transformers does it.
    prompt = tokens[:16]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32, min_new_tokens=32)[0, 16:].tolist()
    assert genai_greedy(out, prompt, 32) == expected


def test_int4_export_is_weight_only_and_measured(export_models, smol_tokenizer, tmp_path, record_property):
    folder, model = pruned_folder(export_models["llama"], tmp_path)
    fp32, int4 = tmp_path / "fp32", tmp_path / "int4"
    export_onnx(folder, fp32, OnnxPrecision.fp32, tmp_path / "cache")
    export_onnx(folder, int4, OnnxPrecision.int4, tmp_path / "cache")
    check = check_onnx(int4, TINY_BLOCKS - 2)
    assert check.matmul_nbits >= 4 * (TINY_BLOCKS - 2)  # q/k/v (or fused), o, gate/up, down per block
    assert check.bytes < check_onnx(fp32, TINY_BLOCKS - 2).bytes
    _, tokens = wiki_tokens(smol_tokenizer, 256)
    windows = torch.tensor(tokens).view(2, 128).numpy()
    ppl = {p.value: onnx_perplexity(d, windows) for p, d in ((OnnxPrecision.fp32, fp32), (OnnxPrecision.int4, int4))}
    record_property("onnx_ppl", json.dumps(ppl))
    print("\ntiny-model ONNX perplexity:", ppl)
    assert all(v < float("inf") for v in ppl.values())


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_default_int4_of_a_tied_model_loads_in_both_runtimes(arch, smol_tokenizer, tmp_path):
    """The default int4 settings give a tied model's embedding a matrix of its own (int4 lookup) and
    its head int8 (a tied head in int8 or asymmetric int4 does not load in onnxruntime): the export
    loads in onnxruntime and onnxruntime-genai, with int8 and int4 weights, and scores text."""
    from tests.conftest import build_export_model

    folder = build_export_model(arch, tmp_path / "tied", smol_tokenizer, tie_word_embeddings=True)
    out = tmp_path / "int4"
    export_onnx(folder, out, OnnxPrecision.int4, tmp_path / "cache")
    check = check_onnx(out, TINY_BLOCKS)
    assert check.genai_loads and check.matmul_nbits > 0
    import onnx

    bits = {a.i for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node
            if node.op_type in ("MatMulNBits", "GatherBlockQuantized") for a in node.attribute if a.name == "bits"}
    assert bits == {4, 8}
    _, tokens = wiki_tokens(smol_tokenizer, 128)
    assert onnx_perplexity(out, torch.tensor(tokens).view(1, 128).numpy()) < float("inf")


def test_onnx_build_and_export_cli(export_models, calib_txt, tmp_path):
    out = tmp_path / "build"
    result = runner.invoke(app, [str(a) for a in ("build", "--target", "onnx", "--onnx-precision", "fp32", "--model",
                                                   export_models["qwen2"], "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64,
                                                   "--remove", 2, "--keep-hf", "--out", out, "--quiet")])
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    [e] = manifest.exports
    assert e.target == "onnx" and e.format_type == "fp32" and e.check["layers"] == 6
    assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / "genai_config.json").is_file()
    assert (out / "hf" / "config.json").is_file()
    assert "onnxruntime_genai" in (out / "README.md").read_text()
    dense = tmp_path / "dense"
    result = runner.invoke(app, ["export", "--target", "onnx", "--model", str(export_models["qwen2"]), "--out", str(dense), "--quiet"])
    assert result.exit_code == 0, result.output
    info = json.loads((dense / "export.json").read_text())
    assert info["format_type"] == "int4" and info["check"]["layers"] == TINY_BLOCKS and info["check"]["matmul_nbits"] > 0


def test_unsupported_architecture_is_a_clear_error():
    from dataclasses import replace

    from mi_prun.runtimes.onnx_export import check_supported
    from mi_prun.archs import spec_for
    from mi_prun.errors import UserError

    with pytest.raises(UserError, match="does not support 'llama'.*--target gguf"):
        check_supported(replace(spec_for("llama"), onnx_genai_supported=False))
