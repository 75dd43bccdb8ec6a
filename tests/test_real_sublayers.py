"""The real default model as a deci GGUF with sublayers taken out: llama.cpp against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mi_prun.load import load_model
from mi_prun.runtimes import llamacpp
from mi_prun.runtimes.formats import GGUFType
from mi_prun.runtimes.gguf_export import check_gguf, export_gguf
from mi_prun.runtimes.deci import write_deci
from mi_prun.runtimes.parity import compare_logits, transformers_logits
from mi_prun.sublayer_maps import dropped_blocks, shipped_weights
from mi_prun.sublayers import layer_forms
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
