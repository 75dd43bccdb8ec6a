"""The README.md model card of a build: what was removed, how it was measured, how to run it."""

from __future__ import annotations

from pathlib import Path

from .manifest import MANIFEST_NAME, PruningManifest


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _run_gguf(file: str) -> list[str]:
    return [
        "### Run with llama.cpp",
        "",
        "```bash",
        f"llama-cli -m {file} -cnv            # chat, using the chat template stored in the file",
        f"llama-server -m {file} --port 8080  # OpenAI-compatible server",
        "```",
        "",
        "From Python (`pip install llama-cpp-python`):",
        "",
        "```python",
        "from llama_cpp import Llama",
        f'llm = Llama(model_path="{file}", n_ctx=2048)',
        'print(llm.create_chat_completion(messages=[{"role": "user", "content": "Hello!"}])["choices"][0]["message"]["content"])',
        "```",
        "",
    ]


def _run_onnx(folder: str) -> list[str]:
    return [
        "### Run with onnxruntime-genai",
        "",
        "```python",
        "import onnxruntime_genai as og",
        f'model = og.Model("{folder}")',
        "tokenizer = og.Tokenizer(model)",
        "params = og.GeneratorParams(model)",
        "params.set_search_options(max_length=256)",
        "generator = og.Generator(model, params)",
        'generator.append_tokens(tokenizer.encode("The capital of France is"))',
        "while not generator.is_done():",
        "    generator.generate_next_token()",
        "print(tokenizer.decode(generator.get_sequence(0)))",
        "```",
        "",
        f"`{folder}/model.onnx` also loads in plain `onnxruntime` (inputs: `input_ids`, `attention_mask`,",
        "`past_key_values.N.key/value`; outputs: `logits`, `present.N.key/value`).",
        "",
    ]


def _compensation(m: PruningManifest) -> str:
    c = m.compensation
    if c is None or not c.enabled:
        return f"none ({c.note})" if c is not None and c.note else "none"
    folded = [r for r in c.runs if r.folded_into is not None]
    text = "none needed"
    if folded:
        text = f"a linear map per removed run, folded into `{folded[0].weight}` of the block before it: " + "; ".join(
            f"blocks {r.first}-{r.last} -> block {r.folded_into}" for r in folded
        )
    return text + (f" ({c.note})" if c.note else "")


def _healing(m: PruningManifest) -> str:
    h = m.heal
    toward = ("each block's output distilled toward the dense state after it" if h.objective == "blocks"
              else "distilled toward the dense model's next-token distribution")
    norms = ""
    if h.norms:
        where = "of every kept block" if h.objective == "logits" else "of the same blocks"
        norms = f" and the weights of {', '.join(f'`{x}`' for x in h.norms)} {where}"
    text = (f"LoRA rank {h.rank} on {', '.join(f'`{x}`' for x in h.modules)} of blocks {h.blocks}{norms}, {toward}, "
            f"on {h.windows} x {h.seq_len} tokens of `{h.text}` text: {h.steps} steps, {h.seconds:.0f} s ({h.precision}), "
            f"{h.fit()}; merged into the weights")
    if h.heldout_before is not None and h.heldout_after is not None:
        text += f"; held-out perplexity {h.heldout_before:.2f} -> {h.heldout_after:.2f}"
    return text


def model_card(manifest: PruningManifest, keep_hf: bool = False) -> str:
    m = manifest
    lines = [
        f"# {Path(m.source_model).name} with {len(m.removed)} of {m.blocks_before} blocks removed",
        "",
        f"Made by mi-prun-edge {m.tool_version}: blocks chosen by `{m.method}`"
        + (f" (MI estimator `{m.estimator}`)" if m.method.startswith("mi-prun") else "")
        + f", calibrated on {m.calibration.n_samples} x {m.calibration.seq_len} tokens of `{m.calibration.source}`.",
        "",
        "| | |",
        "|---|---|",
        f"| source model | `{m.source_model}` ({m.architecture}) |",
        f"| blocks | {m.blocks_before} -> {m.blocks_after} |",
        f"| removed blocks (original indices) | {m.removed} |",
        f"| compensation | {_compensation(m)} |",
        *([f"| healing | {_healing(m)} |"] if m.heal else []),
        f"| decision record | [`{MANIFEST_NAME}`]({MANIFEST_NAME}) |",
        "",
        "## Quality",
        "",
    ]
    if m.quality is None:
        lines += ["Not measured in this build (pass `--eval TEXT` to `mi-prun-edge build`, or run `mi-prun-edge eval`).", ""]
    else:
        q = m.quality
        lines += [
            f"Measured with transformers on `{q.data}`: {q.windows} windows x {q.seq_len} tokens ({q.tokens} scored tokens).",
            "",
            "| dense perplexity | pruned perplexity | KL(dense \\|\\| pruned) per token | top-1 agreement with dense |",
            "|---|---|---|---|",
            f"| {q.dense_ppl:.2f} | {q.pruned_ppl:.2f} | {q.kl_to_dense:.4f} nats | {q.top1_agreement:.1%} |",
            "",
            ("Removing blocks costs quality, and a short heal recovers only part of it" if m.heal else
             "Removing blocks without retraining costs quality") + "; judge it on text of your own use case.",
            "",
        ]
    lines += ["## Files", "", "| file | format | size | made by |", "|---|---|---|---|"]
    for e in m.exports:
        lines.append(f"| `{e.file}` | {e.target} {e.format_type} | {_size(e.bytes)} | {e.route} |")
    if keep_hf:
        lines.append("| `hf/` | Hugging Face checkpoint (plain `transformers`, no custom code) | | repack |")
    lines.append("")
    for e in m.exports:
        for w in e.warnings:
            lines += [f"> Note: {w}", ""]
        if e.target == "gguf":
            lines += _run_gguf(e.file)
        elif e.target == "onnx":
            lines += _run_onnx(e.file)
    if keep_hf:
        lines += [
            "### Run with transformers",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("hf")',
            'tokenizer = AutoTokenizer.from_pretrained("hf")',
            "```",
            "",
        ]
    return "\n".join(lines)


def write_model_card(folder: Path, manifest: PruningManifest, keep_hf: bool = False) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(manifest, keep_hf))
    return path
