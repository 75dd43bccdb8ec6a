"""frontier on a tiny GGUF: every point built, quantized and measured in llama.cpp; budgets pick from it."""

import json
import shutil
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from mi_prun.runtimes import llamacpp
from mi_prun.runtimes.gguf_prune import field_value, open_gguf
from mi_prun.runtimes.formats import GGUFType
from mi_prun.runtimes.gguf_export import export_gguf
from mi_prun.budget import Budget, parse_fraction, parse_size, pick
from mi_prun.cli import app
from mi_prun.errors import UserError
from mi_prun.frontier import Frontier, pareto
from mi_prun.frontier.measure import work_dir
from mi_prun.frontier.report import report as frontier_report
from mi_prun.manifest import PruningManifest
from mi_prun.plan import Granularity
from tests.conftest import TINY_BLOCKS, WIKI_TEST

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def frontier_args(src, calib_txt, out):
    # f16 is the type of the source and of its in-place builds: those points are not quantized again.
    # --sublayer-at 2: the 2-block point is built with --granularity sublayer too (a deci GGUF), and
    # once more with 2 of its kept attention sublayers as linear maps (--linear-attention 2).
    return ("frontier", "--model", src, "--remove", "0,2,4", "--sublayer-at", 2, "--linear-attention", 2, "--long-context", 256,
            "--gguf-types", "f16,q4_0", "--eval", WIKI_TEST,
            "--eval-windows", 2, "--eval-seq-len", 64, "--kl-windows", 1, "--speed-repeats", 2,
            "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--out", out, "--quiet")


@pytest.fixture(scope="module")
def measured(export_models, calib_txt, tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    src = root / "tiny.f16.gguf"
    export_gguf(export_models["llama"], src, GGUFType.f16, root)
    out = root / "frontier"
    result = invoke(*frontier_args(src, calib_txt, out))
    assert result.exit_code == 0, result.output
    assert not work_dir(out).exists()
    return src, out, json.loads((out / "frontier.json").read_text())


def test_every_point_is_built_loaded_and_measured(measured):
    src, out, frontier = measured
    points = frontier["points"]
    # 0, 2 and 4 blocks removed, and 2 blocks' worth of sublayers without and with 2 linear attentions,
    # each as built (f16 in place) and quantized to q4_0.
    assert sorted((p["removed_blocks"], p["granularity"], len(p["linear_attention"] or []), p["type"].split()[0]) for p in points) == sorted(
        [(n, "block", 0, t) for n in (0, 2, 4) for t in ("f16", "q4_0")] + [(2, "sublayer", k, t) for k in (0, 2) for t in ("f16", "q4_0")])
    # llama.cpp's f16 KV cache: a key and a value row of every KV head per token, in each layer that keeps attention.
    reader = open_gguf(src)
    heads, kv_heads, width = (int(field_value(reader, f"llama.{k}")) for k in ("attention.head_count", "attention.head_count_kv", "embedding_length"))
    per_layer = 256 * 2 * kv_heads * (width // heads) * 2
    dense_kv = points[0]["kv_cache_bytes"]
    for p in points:
        path = out / p["file"] if not p["file"].startswith("/") else p["file"]
        assert llamacpp.load_check(path)["layers"] == TINY_BLOCKS - len(p["removed"])
        assert p["bytes"] > 0 and p["decode_tok_s"]["median"] > 0 and len(p["decode_tok_s"]["runs"]) == 2
        assert p["decode_tok_s_long"]["median"] > 0 and len(p["decode_tok_s_long"]["runs"]) == 2
        # Each layer whose attention is gone or linear keeps none of it (the rest of the state per token is the same).
        units = p["removed_sublayers"] or [f"{b}.attention" for b in p["removed"]]
        no_kv = sum(u.endswith(".attention") for u in units) + len(p["linear_attention"] or [])
        assert dense_kv - p["kv_cache_bytes"] == per_layer * no_kv
    sub = next(p for p in points if p["granularity"] == "sublayer" and not p["linear_attention"])
    assert sub["removed_sublayers"] and PruningManifest.read(out / "remove-2-sublayer").sublayers.removed == sub["removed_sublayers"]
    linear = next(p for p in points if p["linear_attention"])
    shipped = PruningManifest.read(out / "remove-2-sublayer-linear2").sublayers
    assert linear["linear_attention"] == [a.block for a in shipped.linear_attention] and len(linear["linear_attention"]) == 2
    assert not set(linear["linear_attention"]) & {int(u.split(".")[0]) for u in shipped.removed}
    as_given = points[0]
    assert as_given["removed_blocks"] == 0 and as_given["file"] == str(src)
    # The model as given against itself: no divergence, every top-1 the same.
    assert as_given["kl_to_dense"] == pytest.approx(0, abs=1e-9) and as_given["top1_agreement"] == 1.0
    # Fewer blocks and fewer bits make smaller files, and quality measured in llama.cpp moves away from the model as given.
    by = {(p["removed_blocks"], p["type"].split()[0]): p for p in points if p["granularity"] == "block"}
    assert by[(4, "q4_0")]["bytes"] < by[(2, "q4_0")]["bytes"] < by[(0, "q4_0")]["bytes"] < by[(0, "f16")]["bytes"]
    assert by[(4, "f16")]["kl_to_dense"] > 0
    # Machine load recorded over the whole run and over the timing alone (the figures it can falsify).
    assert frontier["timing_contention"]["wall_s"] <= frontier["contention"]["wall_s"]
    report = (out / "frontier.md").read_text()
    assert report.count("\n|") == len(points) + 2 and (out / "frontier.png").stat().st_size > 0
    assert "KV cache @256 MiB" in report and "2 blocks' worth, as built: sublayers" in report
    assert "| 2 sublayer +2 linear |" in report and "with attention as linear maps in blocks" in report


def test_report_explains_sublayer_and_linear_rows_only_where_it_has_them(measured):
    frontier = Frontier.model_validate(measured[2])
    full = frontier_report(frontier)
    assert "A sublayer point" in full and "+K linear" in full
    without_linear = frontier.model_copy(update={"points": [p for p in frontier.points if not p.linear_attention]})
    assert "A sublayer point" in frontier_report(without_linear) and "+K linear" not in frontier_report(without_linear)
    blocks = frontier.model_copy(update={"points": [p for p in frontier.points if p.granularity is Granularity.block]})
    text = frontier_report(blocks)
    assert "KV cache @256 MiB" in text and "A sublayer point" not in text and "+K linear" not in text


def test_fronts_hold_the_points_no_other_beats(measured):
    points = measured[2]["points"]
    best = min(points, key=lambda p: p["ppl_primary"])
    smallest = min(points, key=lambda p: (p["bytes"], p["ppl_primary"]))
    assert best["on_size_front"] and best["on_speed_front"] and smallest["on_size_front"]
    for p in points:
        if p["on_size_front"]:  # nothing both smaller-or-equal and strictly better
            assert not any(q["bytes"] <= p["bytes"] and q["ppl_primary"] < p["ppl_primary"] for q in points)
    # A point beaten on both axes is off the front.
    toy = [SimpleNamespace(ppl_primary=1.0, bytes=10), SimpleNamespace(ppl_primary=2.0, bytes=20), SimpleNamespace(ppl_primary=3.0, bytes=5)]
    assert pareto(toy, lambda a, b: a.bytes <= b.bytes) == [True, False, True]
    # Equal on both axes: neither beats the other.
    twins = [SimpleNamespace(ppl_primary=1.0, bytes=10), SimpleNamespace(ppl_primary=1.0, bytes=10)]
    assert pareto(twins, lambda a, b: a.bytes <= b.bytes) == [True, True]


def test_build_with_a_size_budget_ships_the_best_point_that_fits(measured, tmp_path):
    src, out, frontier = measured
    points = frontier["points"]
    limit = sorted(p["bytes"] for p in points)[len(points) // 2]  # about half the points fit
    result = invoke("build", "--model", src, "--frontier", out, "--max-size", f"{limit}B", "--out", tmp_path / "ship")
    assert result.exit_code == 0, result.output
    fits = [p for p in points if p["bytes"] <= limit]
    expected = min(fits, key=lambda p: (p["ppl_primary"], p["bytes"]))
    [shipped] = (tmp_path / "ship").glob("*.gguf")
    assert shipped.stat().st_size <= limit
    assert llamacpp.load_check(shipped)["layers"] == TINY_BLOCKS - len(expected["removed"])
    picked = json.loads((tmp_path / "ship" / "budget.json").read_text())["picked"]
    assert [picked[k] for k in ("removed_blocks", "granularity", "type")] == [expected[k] for k in ("removed_blocks", "granularity", "type")]
    assert (tmp_path / "ship" / "pruning.json").is_file() == (expected["removed_blocks"] > 0)


def test_speed_budget_and_unmeetable_budget(measured, tmp_path):
    src, out, frontier = measured
    fastest = max(p["speedup"] for p in frontier["points"])
    result = invoke("build", "--model", src, "--frontier", out, "--min-speedup", fastest * 2, "--out", tmp_path / "none")
    assert result.exit_code == 2 and "no measured point meets the budget" in result.output
    assert not (tmp_path / "none").exists()
    point, why = pick(Frontier.model_validate(frontier), Budget(min_speedup=1.0))
    assert point.speedup >= 1.0 and all(p["ppl_primary"] >= point.ppl_primary for p in frontier["points"] if p["speedup"] >= 1.0)


def test_budget_input_errors_are_one_line_before_any_work(measured, tmp_path):
    src, out, _ = measured
    assert parse_size("64MiB") == 64 * 2**20 and parse_size("1.5GB") == 1_500_000_000 and parse_fraction("10%") == 0.1
    with pytest.raises(UserError):
        parse_size("sixty")
    no_frontier = invoke("build", "--model", src, "--max-size", "1MiB", "--out", tmp_path / "a")
    assert no_frontier.exit_code == 2 and "mi-prun-edge frontier" in no_frontier.output
    both = invoke("build", "--model", src, "--frontier", out, "--max-size", "1MiB", "--remove", 2, "--out", tmp_path / "b")
    assert both.exit_code == 2 and "--remove" in both.output
    missing = invoke("build", "--model", src, "--frontier", tmp_path, "--max-size", "1MiB", "--out", tmp_path / "c")
    assert missing.exit_code == 2 and "frontier.json" in missing.output
    # The other target's types are refused, not ignored.
    other = invoke("frontier", "--target", "onnx", "--gguf-types", "q4_0", "--model", src, "--eval", WIKI_TEST, "--out", tmp_path / "d")
    assert other.exit_code == 2 and "--gguf-types applies to --target gguf" in other.output
    other = invoke("frontier", "--onnx-types", "int4", "--model", src, "--eval", WIKI_TEST, "--out", tmp_path / "e")
    assert other.exit_code == 2 and "--onnx-types applies to --target onnx" in other.output
    # Sublayer points: only at points that are built, and only as deci GGUFs.
    unbuilt = invoke("frontier", "--model", src, "--remove", "0,2", "--sublayer-at", 3, "--eval", WIKI_TEST, "--out", tmp_path / "f")
    assert unbuilt.exit_code == 2 and "--sublayer-at [3]: give only points that are built" in unbuilt.output
    onnx = invoke("frontier", "--target", "onnx", "--model", src, "--sublayer-at", 2, "--eval", WIKI_TEST, "--out", tmp_path / "g")
    assert onnx.exit_code == 2 and "--sublayer-at builds llama.cpp's deci GGUFs" in onnx.output
    # Linear attentions: only at sublayer points, and fewer than the attention sublayers such a point keeps.
    alone = invoke("frontier", "--model", src, "--remove", "0,2", "--linear-attention", 2, "--eval", WIKI_TEST, "--out", tmp_path / "h")
    assert alone.exit_code == 2 and "give --sublayer-at too" in alone.output
    many = invoke("frontier", "--model", src, "--remove", "0,2", "--sublayer-at", 2, "--linear-attention", "2,6", "--eval", WIKI_TEST,
                  "--out", tmp_path / "i")
    assert many.exit_code == 2 and "--linear-attention 6:" in many.output and "replace fewer than 6" in many.output
    assert not any((tmp_path / n).exists() for n in "abcdefghi")


@pytest.mark.slow  # a whole frontier run again: make test-slow
def test_an_interrupted_frontier_resumes_from_its_complete_points(measured, calib_txt, tmp_path):
    src, out, frontier = measured
    again = tmp_path / "again"
    work = work_dir(again)
    # What a run of the same frontier interrupted after its first build leaves beside its output.
    shutil.copytree(out / "remove-2", work / "remove-2")
    (work / "plan.json").write_text(json.dumps({"model": frontier["model"], "plan": frontier["plan"]}))
    result = invoke(*frontier_args(src, calib_txt, again))
    assert result.exit_code == 0, result.output
    # The complete point is reused as it was (same build record), the missing one is built.
    assert PruningManifest.read(again / "remove-2").timings_s == PruningManifest.read(out / "remove-2").timings_s
    assert PruningManifest.read(again / "remove-4").timings_s != PruningManifest.read(out / "remove-4").timings_s
    assert not work.exists() and not list(again.glob("*/*.quality.json"))
    def key(p):
        return p["removed_blocks"], p["granularity"], p["type"]

    resumed = {key(p): p["ppl_primary"] for p in json.loads((again / "frontier.json").read_text())["points"]}
    assert resumed == pytest.approx({key(p): p["ppl_primary"] for p in frontier["points"]}, rel=1e-6)


def test_points_of_another_frontier_are_not_reused(tmp_path):
    """The work folder of an interrupted run is kept only for the same model and plan."""
    from mi_prun.frontier import FrontierPlan
    from mi_prun.frontier.measure import prepare_work
    from mi_prun.plan import Plan

    plan = FrontierPlan(build=Plan(remove=1), removes=(0, 2), texts=("held-out.txt",))
    out = tmp_path / "frontier"
    work = prepare_work(out, plan, "model-a")
    (work / "remove-2").mkdir()
    assert prepare_work(out, plan, "model-a") == work and (work / "remove-2").is_dir()  # same plan: resumed
    prepare_work(out, plan.model_copy(update={"windows": 99}), "model-a")
    assert not (work / "remove-2").exists()  # another plan: its points are not reused
    (work / "remove-2").mkdir()
    prepare_work(out, plan.model_copy(update={"windows": 99}), "model-b")
    assert not (work / "remove-2").exists() and json.loads((work / "plan.json").read_text())["model"] == "model-b"


@pytest.mark.slow  # a whole ONNX frontier (about 45 s): make test-slow
def test_onnx_frontier_exports_and_measures_every_point_in_onnxruntime(export_models, calib_txt, tmp_path):
    """--target onnx: each point exported at fp32 and int4 by the model builder, quality in
    onnxruntime, speed in onnxruntime-genai; a size budget ships the picked export folder."""
    from mi_prun.runtimes.onnx_export import OnnxSession, onnx_perplexity

    model, out = export_models["llama"], tmp_path / "onnx-frontier"
    result = invoke("frontier", "--target", "onnx", "--model", model, "--remove", "0,2", "--eval", WIKI_TEST,
                    "--eval-windows", 2, "--eval-seq-len", 64, "--kl-windows", 1, "--speed-repeats", 1,
                    "--calib", calib_txt, "--n-samples", 4, "--seq-len", 64, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    frontier = json.loads((out / "frontier.json").read_text())
    assert frontier["target"] == "onnx" and not work_dir(out).exists()
    by = {(p["removed_blocks"], p["type"]): p for p in frontier["points"]}
    assert sorted(by) == [(0, "fp32"), (0, "int4"), (2, "fp32"), (2, "int4")]
    for (n, _), p in by.items():
        assert OnnxSession(out / p["file"]).layers == TINY_BLOCKS - n and p["decode_tok_s"]["median"] > 0
    reference = by[(0, "fp32")]
    assert reference["kl_to_dense"] == pytest.approx(0, abs=1e-9) and reference["top1_agreement"] == 1.0
    assert by[(2, "fp32")]["kl_to_dense"] > 0 and by[(0, "int4")]["kl_to_dense"] > 0
    assert by[(0, "int4")]["bytes"] < by[(0, "fp32")]["bytes"] and by[(2, "fp32")]["bytes"] < by[(0, "fp32")]["bytes"]
    # The perplexity the frontier records is the export's own in onnxruntime (the first text's windows).
    import numpy as np
    from transformers import AutoTokenizer

    ids = np.array(AutoTokenizer.from_pretrained(model)(WIKI_TEST.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    assert onnx_perplexity(out / by[(2, "int4")]["file"], ids[:128].reshape(2, 64)) == pytest.approx(by[(2, "int4")]["ppl_primary"], rel=1e-5)
    # A size budget below the dense fp32 export ships the best smaller folder, as `onnx/`.
    limit = by[(0, "fp32")]["bytes"] - 1
    shipped = invoke("build", "--model", model, "--frontier", out, "--max-size", f"{limit}B", "--out", tmp_path / "ship")
    assert shipped.exit_code == 0, shipped.output
    expected = min((p for p in by.values() if p["bytes"] <= limit), key=lambda p: (p["ppl_primary"], p["bytes"]))
    assert OnnxSession(tmp_path / "ship" / "onnx").layers == TINY_BLOCKS - expected["removed_blocks"]
    assert (tmp_path / "ship" / "pruning.json").is_file() == (expected["removed_blocks"] > 0)
