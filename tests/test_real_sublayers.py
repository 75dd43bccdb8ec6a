"""The real default model as a deci GGUF with sublayers taken out: llama.cpp against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mi_prun.calibration import calibration_batches
from mi_prun.linear_attention import LinearAttention, fit_linear_attention
from mi_prun.load import default_model_path, load_model
from mi_prun.plan import CalibrationSpec
from mi_prun.runner import Windows
from mi_prun.runtimes import llamacpp
from mi_prun.runtimes.formats import GGUFType
from mi_prun.runtimes.gguf_export import check_gguf, export_gguf
from mi_prun.runtimes.deci import write_deci
from mi_prun.runtimes.parity import compare_logits, transformers_logits
from mi_prun.sublayer_maps import dropped_blocks, fit_unit_maps, shipped_weights
from mi_prun.sublayers import capture_chain, layer_forms
from mi_prun.repack import save_checkpoint

from .conftest import WIKI_TEST

pytestmark = pytest.mark.slow

# Attention gone in 6 layers (2 of them with their feed-forward network: dropped), the feed-forward
# network alone in 3 others (their attention kept, over a zero stub).
REMOVED = [4, 10, 16, 17, 24, 25, 40, 48, 53, 57, 59]


def test_default_model_as_deci_matches_transformers_and_keeps_less_kv_cache(tmp_path):
    loaded = load_model()
    n = loaded.runner.n_blocks
    kept = [b for b in range(n) if b not in dropped_blocks(REMOVED)]
    hf = tmp_path / "hf"
    save_checkpoint(loaded, kept, [], hf, shipped_weights(loaded, REMOVED, []))
    zeroed = tmp_path / "zeroed.f16.gguf"
    export_gguf(hf, zeroed, GGUFType.f16, tmp_path)
    deci = tmp_path / "deci.f16.gguf"
    forms = layer_forms(n, REMOVED)
    report = write_deci(zeroed, deci, [forms[b] for b in kept])
    check = check_gguf(deci, len(kept), uniform=False)
    assert check.arch == "deci" and check.llama_cpp_layers == n - 2 and len(report.stub_ffn_layers) == 3

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokens = llamacpp.tokenize(deci, WIKI_TEST.read_text(encoding="utf-8")[:20000])[:512]
    parity = compare_logits(transformers_logits(model, tokens), llamacpp.logits(deci, tokens))
    assert parity.top1 >= 0.99, parity

    # llama.cpp keeps no KV cache for a layer without attention: of the 28 layers of the checkpoint
    # (two blocks dropped), the llama GGUF with zeroed projections caches all, the deci one the 24
    # that keep their attention.
    zeroed_kv, deci_kv = llamacpp.kv_cache_bytes(zeroed), llamacpp.kv_cache_bytes(deci)
    assert deci_kv / zeroed_kv == pytest.approx(24 / 28, abs=1e-3)


# The three forms together: attention dropped (7, 25 and 26, the last two with their feed-forward
# network: dropped blocks), feed-forward networks dropped (3, 12-17, 24) with their compensation maps,
# and attention as fitted linear maps in four blocks (no q/k/v, no KV cache).
REMOVED_WITH_LINEAR = [7, 14, 25, 27, 29, 31, 33, 35, 49, 50, 51, 52, 53]
LINEAR = [6, 11, 18, 28]


def test_default_model_with_linear_attention_as_deci_matches_transformers(tmp_path):
    loaded = load_model()
    n = loaded.runner.n_blocks
    ids = calibration_batches(loaded, CalibrationSpec(n_samples=8, seq_len=128))
    windows = Windows(ids)
    chain = capture_chain(loaded, windows)
    maps = fit_unit_maps(loaded, chain, REMOVED_WITH_LINEAR)
    linear = [fit_linear_attention(loaded, chain, b) for b in LINEAR]
    assert all(m.heldout_ratio < 1 for m in linear)  # each map predicts the attention better than dropping it
    kept = [b for b in range(n) if b not in dropped_blocks(REMOVED_WITH_LINEAR)]
    hf = tmp_path / "hf"
    save_checkpoint(loaded, kept, [], hf, shipped_weights(loaded, REMOVED_WITH_LINEAR, maps, linear))
    converted = tmp_path / "converted.f16.gguf"
    export_gguf(hf, converted, GGUFType.f16, tmp_path)
    deci = tmp_path / "deci.f16.gguf"
    forms = layer_forms(n, REMOVED_WITH_LINEAR, LINEAR)
    report = write_deci(converted, deci, [forms[b] for b in kept])
    assert report.head_count_kv.count(0) == 1 + len(LINEAR) and check_gguf(deci, len(kept), uniform=False).arch == "deci"

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    for b in LINEAR:
        layer = model.model.layers[kept.index(b)]
        layer.self_attn = LinearAttention(layer.self_attn.o_proj)
    tokens = llamacpp.tokenize(deci, WIKI_TEST.read_text(encoding="utf-8")[:20000])[:512]
    parity = compare_logits(transformers_logits(model, tokens), llamacpp.logits(deci, tokens))
    assert parity.top1 >= 0.99, parity

    # The KV cache keeps the layers with KV heads: 30 attention sublayers less the 3 dropped and the 4 linear.
    kv = llamacpp.kv_cache_bytes(deci) / llamacpp.kv_cache_bytes(Path(default_model_path()))
    assert kv == pytest.approx((n - 3 - len(LINEAR)) / n, abs=1e-3)
