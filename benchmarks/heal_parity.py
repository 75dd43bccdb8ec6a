"""Does a healed model survive export? The default build at N = 4, healed and not, exported as an
f16 GGUF with the Hugging Face checkpoint kept (`--keep-hf`); llama.cpp's logits on the GGUF against
transformers' on the checkpoint, over held-out text (wiki.test.raw): top-1 agreement and KL.

    .venv/bin/python benchmarks/heal_parity.py    # -> reports/heal_parity.{md,json}
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from mi_prun.runtimes import llamacpp
from mi_prun.runtimes.parity import compare_logits, transformers_logits

ROOT = Path(__file__).resolve().parents[1]

WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
BUILD = [sys.executable, "-m", "mi_prun", "build", "--target", "gguf", "--remove", "4", "--gguf-type", "f16", "--keep-hf",
         "--force", "--quiet"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "out" / "heal-parity")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "heal_parity")
    p.add_argument("--tokens", type=int, default=512)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = []
    for name, flags in (("unhealed", []), ("healed", ["--heal"])):
        out = args.work / name
        subprocess.run([*BUILD, *flags, "--out", str(out)], check=True, cwd=ROOT)
        manifest = json.loads((out / "pruning.json").read_text())
        gguf = out / manifest["exports"][0]["file"]
        tokenizer = AutoTokenizer.from_pretrained(out / "hf")
        tokens = tokenizer(WIKI_TEST.read_text(encoding="utf-8")[:20000], add_special_tokens=False)["input_ids"][: args.tokens]
        model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype="float32").eval()
        parity = compare_logits(transformers_logits(model, tokens), llamacpp.logits(gguf, tokens))
        heal = manifest.get("heal") or {}
        rows.append({"model": name, "removed": manifest["removed"], "gguf": gguf.name, "tokens": len(tokens),
                     "top1": parity.top1, "mean_kl": parity.mean_kl, "heal_steps": heal.get("steps"), "heal_s": heal.get("seconds")})
        print(json.dumps(rows[-1]), flush=True)
    payload = {"command": "python benchmarks/heal_parity.py " + " ".join(argv or sys.argv[1:]), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# Healed model: the exported GGUF against the healed checkpoint", "",
             f"Command: `{payload['command']}`. Each model: `mi-prun-edge build --target gguf --remove 4 --gguf-type f16 --keep-hf "
             "[--heal]` on the default model (self-generated calibration, default heal budget); llama.cpp's logits on the f16 GGUF "
             f"against transformers' on the kept checkpoint (`hf/`), over the first {args.tokens} tokens of wiki.test.raw.", "",
             "| model | removed | heal steps | heal s | top-1 agreement | mean KL (checkpoint -> GGUF) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['removed']} | {r['heal_steps'] or ''} | {r['heal_s'] or ''} | {r['top1']:.4f} | {r['mean_kl']:.2e} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
