"""Calibration text sources to token batches.

A source is one of: a local .txt / .jsonl (field `text`) / .parquet (column `text`) file, a
Hugging Face dataset spec (`path[@config][:split]`, with presets such as `wikitext2`), `self`:
text the model generates from seeded prompts, for when no data is at hand, or `python-docs`: the
Python language reference's topics, real text that ships with every CPython.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import distributed
from .errors import UserError, first_line
from .plan import PYTHON_DOCS, SELF_TEXT, CalibrationSpec

DATASET_PRESETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "validation"),
    "wikitext2-test": ("wikitext", "wikitext-2-raw-v1", "test"),
}

# Varied, neutral openings so that self-generated text covers prose, code, dialogue and lists.
SELF_PROMPTS = (
    "The history of the city begins",
    "In this tutorial we will learn how to",
    "def parse_config(path):",
    "Q: What is the capital of France?\nA:",
    "Once upon a time, in a small village,",
    "The results of the experiment show that",
    "Ingredients:\n-",
    "Dear team, I am writing to",
    "The following table lists",
    "Photosynthesis is the process by which",
    "Breaking news:",
    "Step 1:",
)


FILE_SUFFIXES = {".txt", ".raw", ".tokens", ".jsonl", ".parquet"}

def python_docs_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics.values())


def _is_file_source(source: str) -> bool:
    if source == PYTHON_DOCS:
        return False
    path = Path(source).expanduser()
    return path.suffix in FILE_SUFFIXES or path.exists()


def read_text_source(source: str, what: str = "calibration") -> str:
    """All text of a file, dataset or `python-docs` source, joined by blank lines."""
    if source == PYTHON_DOCS:
        return python_docs_text()
    if _is_file_source(source):
        return _read_file(Path(source).expanduser(), what)
    return _read_dataset(source)


def check_text_source(source: str, flag: str) -> None:
    """A file source exists and is a readable file (checked before any model loads); `self` and
    dataset specs are checked when read."""
    if source == SELF_TEXT or not _is_file_source(source):
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{flag} file {path} does not exist")
    if not path.is_file():
        raise UserError(f"{flag} {path} is not a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag} file {path} is not readable")
    if path.suffix not in FILE_SUFFIXES:
        return
    if path.stat().st_size == 0:
        raise UserError(f"{flag} file {path} is empty")


def _dataset_parts(spec: str) -> tuple[str, str | None, str]:
    name, _, split = spec.partition(":")
    if name in DATASET_PRESETS:
        path, config, default_split = DATASET_PRESETS[name]
    else:
        path, _, config = name.partition("@")
        default_split = "train"
    return path, config or None, split or default_split


def canonical_source(source: str) -> str:
    """One spelling per text source (absolute file path, or `path@config:split`), to tell when
    two sources are the same text: evaluation on calibration text must not pass unnoticed."""
    if source in (SELF_TEXT, PYTHON_DOCS):
        return source
    if _is_file_source(source):
        return str(Path(source).expanduser().resolve())
    path, config, split = _dataset_parts(source)
    return f"{path}@{config or ''}:{split}"


def _read_file(path: Path, what: str = "calibration") -> str:
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    try:
        if path.suffix == ".jsonl":
            texts = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise UserError(f"{path}:{number}: each JSON line needs a string field 'text'")
                texts.append(record["text"])
            return "\n\n".join(texts)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise UserError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
            return "\n\n".join(t for t in table.column("text").to_pylist() if t)
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON Lines: {err.msg} at line {err.lineno}") from err
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from err
    except Exception as err:  # pyarrow raises its own error types for corrupt files
        if isinstance(err, UserError):
            raise
        raise UserError(f"cannot read {path}: {first_line(err)}") from err


def _read_dataset(spec: str) -> str:
    """`PATH[@CONFIG][:SPLIT]` (e.g. `wikitext@wikitext-2-raw-v1:test`) or a preset name."""
    path, config, split = _dataset_parts(spec)
    try:
        import datasets

        data = datasets.load_dataset(path, config, split=split)
    except Exception as err:  # network, missing dataset, bad config: all one message for the user
        raise UserError(
            f"cannot load dataset '{spec}' ({first_line(err)}); "
            "give a local .txt/.jsonl/.parquet file, or `self`"
        ) from err
    if "text" not in data.column_names:
        raise UserError(f"dataset '{spec}' has no 'text' column (columns: {', '.join(data.column_names)})")
    return "\n\n".join(t for t in data["text"] if t)


def windows_from_ids(ids: torch.Tensor, n_samples: int, seq_len: int) -> torch.Tensor:
    """`n_samples` non-overlapping windows of `seq_len` tokens spread evenly over the stream."""
    available = ids.numel() // seq_len
    if available < 1:
        raise UserError(
            f"calibration text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}; "
            "give more text or lower --seq-len"
        )
    if available < n_samples:
        raise UserError(
            f"calibration text holds {available} windows of {seq_len} tokens but --n-samples is {n_samples}; "
            "give more text or lower --n-samples / --seq-len"
        )
    starts = torch.linspace(0, available - 1, n_samples).round().long() * seq_len
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    if not text.strip():
        raise UserError("calibration text is empty")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def special_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's special and control tokens (BOS, EOS, padding, markers, unused slots)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return sorted(ids)


def window_seed(seed: int, window: int) -> int:
    """The sampling seed of self-generated window `window`: its text depends on --seed and its
    index only, not on the batch or the process that writes it."""
    import numpy as np

    return int(np.random.SeedSequence([seed, window]).generate_state(1)[0])


class RowSeededSampler:
    """A logits processor that samples every row with its own generator (after top-k and top-p, by
    transformers' own warpers) and leaves only the sampled token, which greedy decoding then takes.
    transformers' sampling draws all rows from one global generator, so a row's text would
    depend on the rows beside it; with this, window i is the same written alone or in any batch."""

    def __init__(self, seeds: list[int], top_k: int, top_p: float) -> None:
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.warpers = [TopKLogitsWarper(top_k=top_k), TopPLogitsWarper(top_p=top_p)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = scores.softmax(-1).cpu()
        picks = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        only = torch.full_like(scores, float("-inf"))
        only[torch.arange(len(picks)), picks.to(scores.device)] = 0.0
        return only


@torch.no_grad()
def self_generated_ids(model, tokenizer, spec: CalibrationSpec, windows: range | None = None) -> torch.Tensor:
    """Sample continuations of seeded prompts from the model itself (no data needed): the windows
    `windows` (default all `n_samples`), each seeded by `window_seed(spec.seed, i)`."""
    windows = range(spec.n_samples) if windows is None else windows
    generator = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(SELF_PROMPTS), generator=generator).tolist()
    prompts = [SELF_PROMPTS[order[i % len(order)]] for i in windows]
    if not prompts:
        return torch.zeros(0, spec.seq_len, dtype=torch.long)
    device = next(model.parameters()).device
    # One batched generate call (left padding): sequential calls take minutes on a CPU.
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        # With the tokenizer's own special tokens: a model trained with a BOS (Gemma) writes
        # degenerate text without it (measured on Gemma 3 270M: distinct 4-grams 9%, its own NLL
        # 0.34 nats per token, rows of "tables tables" and <start_of_image>).
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(
        **batch,
        # Sampling at temperature 1, top-k 50 (transformers' default) and top-p 0.95, done row by row
        # by the sampler; greedy decoding takes its pick.
        do_sample=False,
        logits_processor=[RowSeededSampler([window_seed(spec.seed, i) for i in windows], top_k=50, top_p=0.95)],
        max_new_tokens=spec.seq_len,
        min_new_tokens=spec.seq_len,
        pad_token_id=tokenizer.pad_token_id,
        # Control tokens (image markers, turn markers, unused slots) are not text to calibrate on.
        suppress_tokens=special_token_ids(tokenizer) or None,
    ).cpu()
    pads = (batch["attention_mask"] == 0).sum(dim=1).tolist()
    # Drop each row's left padding; prompt + continuation is at least seq_len tokens long.
    return torch.stack([row[pad : pad + spec.seq_len] for row, pad in zip(out, pads)])


def distinct_ngram_ratio(ids: torch.Tensor, n: int) -> float:
    """Distinct n-grams over all n-grams of the windows (each window on its own; "distinct-n"): near
    1 for varied text, low for text that repeats itself, as a model sampling itself can."""
    grams = ids.unfold(1, n, 1).reshape(-1, n) if ids.shape[1] >= n else ids.new_zeros((0, n))
    return float(torch.unique(grams, dim=0).shape[0] / grams.shape[0]) if len(grams) else 0.0


# n of the distinct-n ratios recorded for the calibration windows.
DIVERSITY_N = (1, 2, 4)


def diversity(ids: torch.Tensor) -> dict[str, float]:
    return {f"distinct_{n}": round(distinct_ngram_ratio(ids, n), 4) for n in DIVERSITY_N}


SELF_NEEDS_MEMORY = "self-generated calibration (--calib self)"


def calibration_batches(loaded, spec: CalibrationSpec) -> torch.Tensor:
    """(n_samples, seq_len) token ids for `spec` (made once per loaded model and spec)."""
    spec.validate()
    key = spec.model_dump_json()
    if key not in loaded.calibration_cache:
        loaded.calibration_cache[key] = _calibration_batches(loaded, spec)
    return loaded.calibration_cache[key]


def _calibration_batches(loaded, spec: CalibrationSpec) -> torch.Tensor:
    if spec.source == SELF_TEXT:
        # Sampling token by token from a model streamed block by block would take hours.
        loaded.require_in_memory(SELF_NEEDS_MEMORY)
        # Distributed: each rank writes its share of the windows (each window seeded by its index),
        # and every rank gets them all: the text one process writes, whatever the number of ranks.
        share = distributed.share(spec.n_samples)
        mine = self_generated_ids(loaded.model, loaded.tokenizer, spec, range(share.start, share.stop))
        return torch.from_numpy(distributed.gather_rows(mine.numpy()))
    return text_windows(loaded, spec.source, spec.n_samples, spec.seq_len)


def text_windows(loaded, source: str, n_samples: int, seq_len: int, at_most: bool = False, what: str = "calibration") -> torch.Tensor:
    """`n_samples` windows of a file, dataset or `python-docs` source; `at_most`: a shorter text
    gives the windows it holds instead of an error."""
    ids = tokenize_text(loaded.tokenizer, read_text_source(source, what))
    if at_most:
        n_samples = max(1, min(n_samples, ids.numel() // seq_len))
    return windows_from_ids(ids, n_samples, seq_len)
