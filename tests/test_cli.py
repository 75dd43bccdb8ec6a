"""The CLI as a user drives it: good paths write complete outputs, bad input one clear line and no output."""

import json
import re

import pytest
from typer.testing import CliRunner

from mi_prun.cli import app
from mi_prun.manifest import PruningManifest

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_prune_writes_checkpoint_and_manifest(tiny_models, calib_txt, tmp_path):
    out = tmp_path / "pruned"
    result = invoke("prune", "--model", tiny_models["gemma3_text"], "--calib", calib_txt, "--n-samples", 4,
                    "--seq-len", 64, "--ratio", 0.25, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(out)
    assert len(manifest.removed) == 2 and manifest.blocks_after == 6
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "pruning.json"}
    assert not list(tmp_path.glob(".pruned.partial-*"))
    # the table names the removed blocks
    assert "removed blocks" in result.output
    # Gemma 3 has a norm after its MLP: its maps are per-channel scales in that norm's weight
    assert manifest.compensation.enabled and manifest.compensation.form == "scale"
    assert all(r.weight == "post_feedforward_layernorm.weight" for r in manifest.compensation.runs if r.folded_into is not None)


def test_compensation_switch_and_its_own_calibration_size(tiny_models, calib_txt, tmp_path):
    from safetensors.numpy import load_file

    common = ["prune", "--model", tiny_models["llama"], "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64,
              "--remove", 3, "--method", "angular", "--quiet"]
    plain, comp = tmp_path / "plain", tmp_path / "comp"
    assert invoke(*common, "--no-compensate", "--out", plain).exit_code == 0
    result = invoke(*common, "--compensation-samples", 6, "--out", comp)
    assert result.exit_code == 0, result.output
    a, b = PruningManifest.read(plain), PruningManifest.read(comp)
    assert a.removed == b.removed and not a.compensation.enabled and a.compensation.runs == []
    assert b.compensation.enabled and b.compensation.samples == 6
    assert "compensation: blocks" in result.output and "held-out error" in result.output
    [run] = b.compensation.runs  # angular removes one contiguous run
    assert run.folded_into == run.first - 1 and run.weight == "mlp.down_proj.weight" and run.fit_error_ratio < 1
    wa, wb = load_file(plain / "model.safetensors"), load_file(comp / "model.safetensors")
    new = b.kept.index(run.folded_into)
    changed = {k for k in wa if not (wa[k] == wb[k]).all()}
    assert changed == {f"model.layers.{new}.mlp.down_proj.weight"}


def test_prune_prints_the_verified_proposals(tiny_models, calib_txt, tmp_path):
    result = invoke("prune", "--model", tiny_models["llama"], "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64,
                    "--remove", 3, "--compensation-samples", 6, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    manifest = PruningManifest.read(tmp_path / "out")
    lines = result.output.splitlines()
    at = next(i for i, l in enumerate(lines) if l.startswith("MI-PRUN proposals, scored by "))
    assert "compensated calibration NLL" in lines[at] and "6 windows" in lines[at]
    shown = [re.fullmatch(r"  ([a-z-]+): \[([0-9, ]+)\] NLL ([0-9.]+)(?: \(lower: p = ([0-9.]+)\))?(  <- kept)?", line)
             for line in lines[at + 1 : at + 1 + len(manifest.selection.candidates)]]
    assert all(shown), lines[at:]
    for c, m in zip(manifest.selection.candidates, shown):
        assert m.group(1) == c.objective and [int(b) for b in m.group(2).split(",")] == c.removed
        assert float(m.group(3)) == pytest.approx(c.calibration_nll, abs=1e-4)
        assert (m.group(4) is None) == (c.lower_p is None)
    # Exactly the proposals that remove the blocks removed are marked kept, and the kept one has the lowest NLL.
    kept = [c for c, m in zip(manifest.selection.candidates, shown) if m.group(5)]
    assert kept and all(c.removed == manifest.removed for c in kept)
    assert min(c.calibration_nll for c in manifest.selection.candidates) == pytest.approx(kept[0].calibration_nll)


def test_score_prints_table_and_writes_heatmap(tiny_models, calib_txt, tmp_path):
    png, js = tmp_path / "h.png", tmp_path / "s.json"
    result = invoke("score", "--model", tiny_models["qwen2"], "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64,
                    "--remove", 2, "--heatmap", png, "--json", js, "--quiet")
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(js.read_text())
    assert len(payload["block_scores"]["mi"]) == 8 and len(payload["removed"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--remove", "0"], "at least one block"),
        (["--remove", "8"], "at least one must stay"),
        (["--ratio", "1.0"], "--ratio must lie"),
        (["--remove", "2", "--ratio", "0.2"], "exactly one"),
        ([], "--remove N or --ratio R"),
        (["--remove", "2", "--method", "magic"], "Invalid value for '--method'"),
        (["--remove", "2", "--calib", "/nonexistent/file.txt"], "does not exist"),
        (["--remove", "2", "--n-samples", "0"], "--n-samples"),
        (["--remove", "2", "--compensation-samples", "0"], "--compensation-samples"),
    ],
)
def test_bad_input_is_one_line_and_no_output(extra, message, tiny_models, calib_txt, tmp_path):
    out = tmp_path / "never"
    args = ["prune", "--model", tiny_models["llama"], "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--out", out, "--quiet"]
    result = invoke(*(args + extra))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_existing_output_needs_force(tiny_models, calib_txt, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["prune", "--model", tiny_models["llama"], "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64,
            "--remove", 2, "--out", out, "--quiet"]
    result = invoke(*args)
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = invoke(*(args + ["--force"]))
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "pruning.json").exists()


def test_unknown_architecture_and_bad_model_paths(tmp_path):
    folder = tmp_path / "gpt2ish"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = invoke("prune", "--model", folder, "--remove", 1, "--out", tmp_path / "o", "--quiet")
    assert result.exit_code == 2
    assert "not supported" in result.output and "llama" in result.output and "gemma3_text" in result.output

    for bad, message in [(tmp_path / "none.gguf", "does not exist"), (tmp_path, "without config.json")]:
        result = invoke("prune", "--model", bad, "--remove", 1, "--out", tmp_path / "o", "--quiet")
        assert result.exit_code == 2 and message in result.output

    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 20)
    result = invoke("prune", "--model", corrupt, "--remove", 1, "--out", tmp_path / "o", "--quiet")
    assert result.exit_code == 2 and "GGUF" in result.output and "Traceback" not in result.output


def test_progress_messages_are_plain_text(capsys):
    """Bracketed names in messages (e.g. a method label like mi-prun[renyi]) are printed as they are."""
    from rich.console import Console

    from mi_prun.progress import Reporter

    console = Console(stderr=True, width=200)
    Reporter(console=console).say("N=2 mi-prun[renyi]: removed [4, 5] from /tmp/[a]/x")
    assert "N=2 mi-prun[renyi]: removed [4, 5] from /tmp/[a]/x" in capsys.readouterr().err
