"""Data-parallel runs under torchrun (gloo, 2 CPU processes): the same decisions, maps and
perplexities as one process; a rank that dies ends the run everywhere, leaving nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import WIKI_VALID

BIN = Path(sys.executable).parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def one_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mi_prun", *args], capture_output=True, text=True, env=ONE_THREAD, timeout=600)


def torchrun(ranks: int, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={ranks}", "-m", "mi_prun", *args]


def two_ranks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(2, *args), capture_output=True, text=True, env=ONE_THREAD, timeout=600)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def prune_args(model: Path, calib: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(model), "--remove", "3", "--calib", str(calib), "--n-samples", "8", "--seq-len", "64",
            "--out", str(out), "--quiet", *extra]


def compensated_tensors(folder: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The rewritten projection weights, by their name in the pruned checkpoint."""
    weights = {}
    for path in folder.glob("*.safetensors"):
        weights.update(load_file(path))
    kept = manifest["kept"]
    names = {}
    for run in manifest["compensation"]["runs"]:
        if run["folded_into"] is not None:
            new = kept.index(run["folded_into"])
            [name] = [k for k in weights if k.endswith(f"layers.{new}.{run['weight']}")]
            names[name] = weights[name]
    return names


def test_two_ranks_decide_and_fit_as_one(tiny_models, calib_txt, tmp_path):
    model = tiny_models["llama"]
    # 7 windows: shares of 3 and 4, so halves and folds cross the ranks unevenly.
    ok(one_process(*prune_args(model, calib_txt, tmp_path / "one", "--n-samples", "7")))
    result = ok(two_ranks(*prune_args(model, calib_txt, tmp_path / "two", "--n-samples", "7")))
    one = json.loads((tmp_path / "one" / "pruning.json").read_text())
    two = json.loads((tmp_path / "two" / "pruning.json").read_text())
    assert two["removed"] == one["removed"]
    # Every proposal was verified on the same windows (NLL summed over the ranks; the per-window
    # NLLs the paired test reads gathered in window order).
    for c_one, c_two in zip(one["selection"]["candidates"], two["selection"]["candidates"], strict=True):
        assert c_two["removed"] == c_one["removed"]
        assert c_two["calibration_nll"] == pytest.approx(c_one["calibration_nll"], rel=1e-6)
        assert len(c_one["window_nll"]) == 7 and c_two["window_nll"] == pytest.approx(c_one["window_nll"], abs=2e-5)
        assert c_two["lower_p"] == pytest.approx(c_one["lower_p"], abs=1e-4) if c_one["lower_p"] is not None else c_two["lower_p"] is None
    assert two["distributed"]["ranks"] == 2 and two["distributed"]["reductions"] > 0
    assert one["distributed"] is None
    assert two["calibration"]["tokens_observed"] == one["calibration"]["tokens_observed"]
    maps_one, maps_two = compensated_tensors(tmp_path / "one", one), compensated_tensors(tmp_path / "two", two)
    assert maps_one and maps_one.keys() == maps_two.keys()
    for name, w in maps_one.items():
        assert torch.linalg.norm(maps_two[name] - w) / torch.linalg.norm(w) < 1e-5, name
    # Only rank 0 wrote: no second output, nothing half-written beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert "error" not in result.stderr


@pytest.mark.slow  # two ranks again: make test-slow
def test_two_ranks_write_the_self_generated_text_of_one(tiny_models, tmp_path):
    """`--calib self` split over two ranks (each writes its share of the windows, each window
    seeded by its index): the same text as one process, so the same decision."""
    model = tiny_models["llama"]
    args = ["prune", "--model", str(model), "--remove", "2", "--calib", "self", "--n-samples", "5", "--seq-len", "32",
            "--seed", "3", "--quiet"]
    ok(one_process(*args, "--out", str(tmp_path / "one")))
    ok(two_ranks(*args, "--out", str(tmp_path / "two")))
    one = json.loads((tmp_path / "one" / "pruning.json").read_text())
    two = json.loads((tmp_path / "two" / "pruning.json").read_text())
    assert two["calibration"]["diversity"] == one["calibration"]["diversity"]
    assert two["removed"] == one["removed"]
    for c_one, c_two in zip(one["selection"]["candidates"], two["selection"]["candidates"], strict=True):
        assert c_two["calibration_nll"] == pytest.approx(c_one["calibration_nll"], rel=1e-6)


@pytest.mark.slow  # two ranks again: make test-slow
def test_two_ranks_evaluate_as_one(tiny_models, calib_txt):
    args = ["eval", "--model", str(tiny_models["gemma3_text"]), "--data", str(calib_txt), "--seq-len", "64",
            "--max-windows", "6", "--reference", str(tiny_models["llama"]), "--json", "-", "--quiet"]
    # (a different model as the reference only to exercise the KL and top-1 sums: same tokenizer)
    one = json.loads(ok(one_process(*args)).stdout)
    two = json.loads(ok(two_ranks(*args)).stdout)  # only rank 0 prints
    assert two["windows"] == one["windows"] == 6 and two["tokens"] == one["tokens"]
    assert two["ppl"] == pytest.approx(one["ppl"], rel=1e-6)
    assert two["kl"] == pytest.approx(one["kl"], rel=1e-6)
    assert two["top1"] == one["top1"]


@pytest.mark.slow  # two ranks again: make test-slow
def test_sleb_verification_over_two_ranks(tiny_models, calib_txt, tmp_path):
    """Every candidate's NLL is a sum over both ranks' windows: SLEB's greedy choice is unchanged."""
    model = tiny_models["qwen3"]
    extra = ("--method", "sleb", "--no-compensate")
    ok(one_process(*prune_args(model, calib_txt, tmp_path / "one", *extra)))
    ok(two_ranks(*prune_args(model, calib_txt, tmp_path / "two", *extra)))
    one = json.loads((tmp_path / "one" / "pruning.json").read_text())
    two = json.loads((tmp_path / "two" / "pruning.json").read_text())
    assert two["removed"] == one["removed"]
    assert two["selection"]["forward_passes"] == one["selection"]["forward_passes"]


def test_what_ranks_cannot_split_is_refused_before_loading(tiny_models, calib_txt, tmp_path):
    start = time.time()
    result = two_ranks(*prune_args(tiny_models["llama"], calib_txt, tmp_path / "out", "--estimator", "gaussian"))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert lines and all("--estimator gaussian" in line and "of 2)" in line for line in lines), result.stderr[-2000:]
    too_few = two_ranks(*prune_args(tiny_models["llama"], calib_txt, tmp_path / "out", "--n-samples", "3"))
    assert too_few.returncode != 0 and "--n-samples 3" in too_few.stderr
    assert not (tmp_path / "out").exists()
    assert time.time() - start < 120


def _rank_pids(parent: int, rank: int) -> list[int]:
    """Processes under `parent` launched as `rank` (read from their environment)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == parent and f"RANK={rank}".encode() in env:
            found.append(int(proc.name))
    return found


def test_killed_rank_stops_every_rank_and_leaves_nothing(tiny_models, calib_txt, tmp_path):
    out = tmp_path / "out"
    # SLEB over many windows of the whole WikiText validation text: about 25 s of work after
    # 5 s of start-up, long enough to be killed in the middle.
    args = prune_args(tiny_models["llama"], WIKI_VALID, out, "--method", "sleb", "--n-samples", "512", "--seq-len", "256")
    launcher = subprocess.Popen(torchrun(2, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    try:
        deadline = time.time() + 120
        victims: list[int] = []
        while not victims and time.time() < deadline:
            time.sleep(0.5)
            victims = _rank_pids(launcher.pid, 1)
        assert victims, "rank 1 never started"
        time.sleep(10)  # past imports and loading, into the work
        assert launcher.poll() is None, "the run ended before it could be killed"
        os.kill(victims[0], signal.SIGKILL)
        killed = time.time()
        _, stderr = launcher.communicate(timeout=90)
        assert time.time() - killed < 60
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "rank" in stderr.lower()
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "half-written output left behind"


@pytest.mark.slow
def test_default_model_two_ranks_prune_as_one(tmp_path):
    """The real default model: `prune` on two ranks decides and fits what one process does (the
    same blocks, maps within 1e-5). The export after it runs on rank 0 alone (tested on the tiny
    models), so `prune` is enough here."""
    args = lambda out: ["prune", "--remove", "4", "--calib", str(WIKI_VALID), "--n-samples", "4",
                        "--out", str(out), "--quiet"]  # noqa: E731
    ok(one_process(*args(tmp_path / "one")))
    ok(two_ranks(*args(tmp_path / "two")))
    one = json.loads((tmp_path / "one" / "pruning.json").read_text())
    two = json.loads((tmp_path / "two" / "pruning.json").read_text())
    assert two["removed"] == one["removed"]
    maps_one = compensated_tensors(tmp_path / "one", one)
    maps_two = compensated_tensors(tmp_path / "two", two)
    assert maps_one and maps_one.keys() == maps_two.keys()
    for name, w in maps_one.items():
        assert torch.linalg.norm(maps_two[name].float() - w.float()) / torch.linalg.norm(w.float()) < 1e-5, name
