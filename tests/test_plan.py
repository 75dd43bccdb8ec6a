"""The plan: validated before any weights load, recorded in pruning.json, replayable with --plan;
bad input and interruptions leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mi_prun.cli import app
from mi_prun.manifest import PruningManifest
from mi_prun.errors import UserError
from mi_prun.plan import Method, Plan

from .conftest import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def prune_args(model, calib, out, *extra):
    return ["prune", "--model", model, "--calib", calib, "--n-samples", 4, "--seq-len", 64, "--out", out, *extra]


def test_a_pruning_json_written_before_the_job_layer_still_replays(tiny_models, tmp_path):
    """tests/data/pruning-before-jobs.json: written by the code before the job layer (fc32386), from
    `prune --remove 2 --calib python-docs --n-samples 4 --seq-len 32` on the tiny llama (blocks 6, 7)."""
    recorded = ROOT / "tests" / "data" / "pruning-before-jobs.json"
    out = tmp_path / "replayed"
    result = invoke("prune", "--plan", recorded, "--model", tiny_models["llama"], "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    replayed = PruningManifest.read(out)
    assert replayed.removed == [6, 7] and replayed.kept == list(range(6))
    assert replayed.selection.replayed_from == str(recorded.resolve())
    assert replayed.plan.calibration.source == "python-docs" and replayed.plan.calibration.seq_len == 32


def test_pruning_json_records_the_plan_and_replays_to_the_same_model(tiny_models, calib_txt, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    result = invoke(*prune_args(tiny_models["llama"], calib_txt, first, "--remove", 3, "--compensation-samples", 6, "--quiet"))
    assert result.exit_code == 0, result.output
    recorded = PruningManifest.read(first)
    assert recorded.plan.remove == 3 and recorded.plan.compensation_samples == 6 and recorded.plan.method is Method.mi_prun
    assert recorded.plan.calibration.source == str(calib_txt)

    result = invoke("prune", "--plan", first / "pruning.json", "--out", again, "--quiet")
    assert result.exit_code == 0, result.output
    replayed = PruningManifest.read(again)
    assert replayed.removed == recorded.removed
    assert replayed.selection.replayed_from == str((first / "pruning.json").resolve())
    assert replayed.selection.candidates == [] and replayed.run_scores == []  # nothing was scored
    # The maps are fitted again on the same calibration windows: the same weights.
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


def test_a_plan_is_refused_on_a_model_it_does_not_fit(tiny_models, calib_txt, tiny_tokenizer, tmp_path):
    made = tmp_path / "made"
    assert invoke(*prune_args(tiny_models["llama"], calib_txt, made, "--remove", 2, "--quiet")).exit_code == 0
    wider = build_tiny_model("llama", tmp_path / "wider", tiny_tokenizer, hidden_size=96, head_dim=24)
    deeper = build_tiny_model("llama", tmp_path / "deeper", tiny_tokenizer, num_hidden_layers=10)
    for model, message in [(tiny_models["qwen3"], "made for a llama model, not qwen3"),
                           (deeper, "made for 8 blocks; this model has 10"),
                           (wider, "hidden_size 96 (plan: 64)")]:
        out = tmp_path / "never"
        result = invoke("prune", "--plan", made, "--model", model, "--out", out)
        assert result.exit_code == 2, result.output
        assert message in result.output and "loading" not in result.output  # before any weights load
        assert not out.exists()
    result = invoke("prune", "--plan", tmp_path / "nothing.json", "--out", tmp_path / "never")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_plan_validation_is_one_line():
    with pytest.raises(UserError, match="^give exactly one of --remove N or --ratio R$"):
        Plan.make(remove=2, ratio=0.5)
    with pytest.raises(UserError, match="^--top-k: Input should be greater than or equal to 1$"):
        Plan.make(remove=2, top_k=0)
    assert Plan.make(ratio=0.25).n_remove(8) == 2


def test_bad_output_and_data_are_reported_before_loading(tiny_models, calib_txt, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    cases = [
        (prune_args(tiny_models["llama"], calib_txt, afile / "out", "--remove", 2), f"{afile} is a file, not a folder"),
        (prune_args(tiny_models["llama"], tmp_path / "missing.txt", tmp_path / "o", "--remove", 2),
         f"--calib file {tmp_path / 'missing.txt'} does not exist"),
        (["build", "--model", tiny_models["llama"], "--calib", calib_txt, "--eval", tmp_path / "nope.txt",
          "--out", tmp_path / "o"], f"--eval file {tmp_path / 'nope.txt'} does not exist"),
        (["eval", "--model", tiny_models["llama"], "--data", tmp_path / "missing.txt"],
         f"--data file {tmp_path / 'missing.txt'} does not exist"),
    ]
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "loading" not in result.output and "Traceback" not in result.output
        assert not (tmp_path / "o").exists()
    assert afile.read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigterm_leaves_nothing_behind(tiny_models, calib_txt, tmp_path):
    """A `timeout` or container stop mid-run: exit 143, no output folder, no partial folder.
    The signal is sent when a stage announces itself: loading, then calibration/selection."""
    for stage in ("loading", "calibration:"):
        out = tmp_path / f"out-{stage.strip(':')}"
        args = prune_args(tiny_models["llama"], calib_txt, out, "--remove", 3, "--method", "sleb", "--n-samples", 64)
        proc = subprocess.Popen([sys.executable, "-m", "mi_prun", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        seen = []
        while not any(stage in line for line in seen):
            line = proc.stderr.readline()
            assert line, f"the run ended before '{stage}': {seen}"
            seen.append(line)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, "".join(seen) + err[-2000:]
        assert "terminated (SIGTERM)" in err and "Traceback" not in err
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))
