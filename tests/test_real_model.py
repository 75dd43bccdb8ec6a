"""The real default model (SmolLM2-135M-Instruct, 30 blocks): prune 4 blocks with mi-prun, end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mi_prun.calibration import CalibrationSpec, tokenize_text
from mi_prun.evaluate import eval_windows, perplexity
from mi_prun.blockset import blocks_kept
from mi_prun.compensate import applied, removal_runs
from mi_prun.load import load_model
from mi_prun.manifest import PruningManifest
from mi_prun.pipeline import prune, save_pruned
from mi_prun.plan import Plan

from .conftest import WIKI_TEST, WIKI_VALID

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruned_default(tmp_path_factory):
    loaded = load_model()  # no --model: the embedded default GGUF, dequantized
    assert loaded.spec.model_type == "llama" and loaded.model.config.num_hidden_layers == 30
    windows = eval_windows(tokenize_text(loaded.tokenizer, WIKI_TEST.read_text(encoding="utf-8")), 512, 4)
    dense = perplexity(loaded.runner, windows)
    opts = Plan(remove=4, calibration=CalibrationSpec(str(WIKI_VALID), n_samples=8, seq_len=256))
    result = prune(loaded, opts)
    out = tmp_path_factory.mktemp("real") / "smollm2-pruned"
    manifest = save_pruned(loaded, opts, result, out)
    # Saving leaves the loaded model dense; the same decision applied in memory is the reference.
    # The runner's pruned pass, and the model's own forward with the maps folded in and the blocks skipped.
    in_memory = perplexity(loaded.runner, windows, removal_runs(result.removed, result.compensation))
    with applied(loaded.model, loaded.spec, result.compensation), blocks_kept(loaded.model, loaded.spec, result.kept):
        with torch.no_grad():
            in_memory_logits = loaded.model(input_ids=windows[:1, :128]).logits
    return out, manifest, windows, dense, (in_memory, in_memory_logits), loaded


def test_default_model_prunes_reloads_and_generates(pruned_default, record_property):
    out, manifest, windows, dense, (in_memory, in_memory_logits), loaded = pruned_default
    assert len(manifest.removed) == 4 and manifest.blocks_after == 26
    assert PruningManifest.read(out).removed == manifest.removed

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 26
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=windows[:1, :128]).logits, in_memory_logits, rtol=0, atol=0)

    reloaded = perplexity(load_model(str(out)).runner, windows)
    assert math.isfinite(reloaded.ppl) and reloaded.ppl == pytest.approx(in_memory.ppl, rel=1e-6)
    # pruning costs quality, but a sane selection keeps the model usable
    assert dense.ppl < reloaded.ppl < 10 * dense.ppl

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    new = generated[0, prompt["input_ids"].shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True)
    record_property("generated", text)
    eos = model.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    # 12 new tokens, or fewer when the model ended its answer itself (an end-of-sequence token)
    assert text.strip() and (len(new) == 12 or (0 < len(new) < 12 and int(new[-1]) in eos)), (text, new.tolist())

    record = {
        "removed": manifest.removed,
        "eval_tokens": reloaded.tokens,
        "dense_ppl": round(dense.ppl, 3),
        "pruned_ppl": round(reloaded.ppl, 3),
        "timings_s": manifest.timings_s,
        "compensation": [r.model_dump() for r in manifest.compensation.runs],
        "generation": text,
    }
    record_property("real_model", json.dumps(record))
    print("\nreal-model record:", json.dumps(record))
