"""`mi-prun-edge eval`: windows, perplexity, KL and top-1 against independent computations and the CLI."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from mi_prun.cli import app
from mi_prun.evaluate import eval_windows, evaluate, final_states, perplexity, strided_windows
from mi_prun.load import load_model
from mi_prun.plan import Execution

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_strided_windows_score_every_token_once():
    ids = torch.arange(1000)
    w = strided_windows(ids, 100, 30)
    assert w.ids.shape == (31, 100) and (w.ids[3] == torch.arange(90, 190)).all()
    # Scored targets are the tokens at window offset first_target+1 .. end: each position once, none skipped.
    scored = torch.cat([w.ids[k, 1:][w.target_mask()[k]] for k in range(len(w))])
    assert scored.tolist() == list(range(1, 30 * 30 + 100))
    plain = strided_windows(ids, 100)
    assert plain.target_mask().all() and plain.ids.shape == (10, 100)
    assert strided_windows(ids, 100, max_windows=3).ids.shape == (3, 100)
    with pytest.raises(ValueError):
        strided_windows(ids[:50], 100)


def runner_of(folder):
    return load_model(str(folder), execution=Execution.in_memory)


def scored(loaded, windows, reference=None):
    final, _ = final_states(loaded.runner, windows.ids)
    ref = None if reference is None else (reference.runner, final_states(reference.runner, windows.ids)[0])
    return evaluate(loaded.runner, final, windows, ref)


def test_non_overlapping_eval_matches_plain_perplexity(tiny_models, tiny_tokenizer, calib_txt):
    loaded = runner_of(tiny_models["llama"])
    ids = torch.tensor(tiny_tokenizer(calib_txt.read_text()[:20000])["input_ids"])
    plain = perplexity(loaded.runner, eval_windows(ids, 64, 6))
    result = scored(loaded, strided_windows(ids, 64, max_windows=6))
    assert result.tokens == plain.tokens == 6 * 63
    assert result.nll == pytest.approx(plain.nll, rel=1e-6)
    assert result.kl is None and result.top1 is None


def test_strided_nll_matches_token_by_token_sum(tiny_models, tiny_tokenizer, calib_txt):
    loaded = runner_of(tiny_models["qwen3"])
    loaded.runner.batch_size = 3
    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"]).eval()
    ids = torch.tensor(tiny_tokenizer(calib_txt.read_text()[:5000])["input_ids"])[:200]
    result = scored(loaded, strided_windows(ids, 64, 16))
    # Independent: token t (t >= 1) predicted from the window that first scores it, by the model's own forward.
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range((200 - 64) // 16 + 1):
            window = ids[k * 16 : k * 16 + 64]
            logp = F.log_softmax(model(window[None]).logits[0, :-1].float(), -1)
            first = 0 if k == 0 else 64 - 1 - 16
            for j in range(first, 63):
                total -= float(logp[j, window[j + 1]])
                count += 1
    assert result.tokens == count
    assert result.nll == pytest.approx(total / count, rel=1e-5)


def test_kl_and_top1_against_reference(tiny_models, tiny_tokenizer, calib_txt):
    loaded, other_loaded = runner_of(tiny_models["llama"]), runner_of(tiny_models["mistral"])
    model, other = loaded.model, other_loaded.model
    ids = torch.tensor(tiny_tokenizer(calib_txt.read_text()[:20000])["input_ids"])
    windows = strided_windows(ids, 64, max_windows=4)
    same = scored(loaded, windows, loaded)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0
    diff = scored(loaded, windows, other_loaded)
    # Independent KL with torch's kl_div (target = reference log-probs), from the models' own forwards.
    with torch.no_grad():
        p = F.log_softmax(other(windows.ids).logits[:, :-1].float(), -1)
        q = F.log_softmax(model(windows.ids).logits[:, :-1].float(), -1)
    expected = F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean()
    assert diff.kl == pytest.approx(float(expected), rel=1e-5) and diff.kl > 0.01
    assert diff.top1 == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()))


@pytest.fixture(scope="module")
def pruned_folder(tiny_models, calib_txt, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "pruned"
    result = invoke("prune", "--model", tiny_models["qwen2"], "--calib", calib_txt, "--n-samples", 4,
                    "--seq-len", 64, "--remove", 2, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_eval_cli_json_with_reference(pruned_folder, tiny_models, tmp_path):
    data = tmp_path / "held_out.txt"
    from tests.conftest import WIKI_TEST

    data.write_text(WIKI_TEST.read_text(encoding="utf-8")[:30000])
    js = tmp_path / "eval.json"
    result = invoke("eval", "--model", pruned_folder, "--reference", tiny_models["qwen2"], "--data", data,
                    "--seq-len", 64, "--max-windows", 5, "--json", js, "--quiet")
    assert result.exit_code == 0, result.output
    assert "WARNING" not in result.output and "top-1 agreement" in result.output
    payload = json.loads(js.read_text())
    assert payload["windows"] == 5 and payload["tokens"] == 5 * 63
    assert payload["kl"] > 0 and 0 < payload["top1"] < 1 and math.isfinite(payload["ppl"])
    # The dense model against itself: zero KL, full agreement.
    result = invoke("eval", "--model", tiny_models["qwen2"], "--reference", tiny_models["qwen2"], "--data", data,
                    "--seq-len", 64, "--max-windows", 2, "--json", "-", "--quiet")
    payload = json.loads(result.stdout)
    assert payload["top1"] == 1.0 and payload["kl"] == pytest.approx(0, abs=1e-6)


def test_eval_on_calibration_text_warns(pruned_folder, calib_txt):
    result = invoke("eval", "--model", pruned_folder, "--data", calib_txt, "--seq-len", 64, "--max-windows", 2, "--quiet")
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output and "calibration text" in result.output


def test_eval_bad_input(pruned_folder, tiny_models, tmp_path, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    result = invoke("eval", "--model", pruned_folder, "--data", short, "--seq-len", 64, "--quiet")
    assert result.exit_code == 2 and "fewer than one window" in result.output
    result = invoke("eval", "--model", pruned_folder, "--data", tmp_path / "none.txt", "--quiet")
    assert result.exit_code == 2 and "does not exist" in result.output
    # lm-eval absent (blocked import): a clear line naming the extra to install.
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    data = tmp_path / "d.txt"
    data.write_text(" ".join(["word"] * 400))
    result = invoke("eval", "--model", pruned_folder, "--data", data, "--seq-len", 64, "--tasks", "arc_easy", "--quiet")
    assert result.exit_code == 2 and "mi-prun-edge[tasks]" in result.output and "Traceback" not in result.output
