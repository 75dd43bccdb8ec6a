"""Fixtures: tiny randomly initialized models of every supported architecture, built locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2"
WIKI_VALID = SHARED_DATA / "wiki.valid.tokens"
WIKI_TEST = SHARED_DATA / "wiki.test.raw"

TINY_BLOCKS = 8
_COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=TINY_BLOCKS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
TINY_CONFIGS = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=32),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON),
    # Alternating sliding/full attention exercises per-layer config slicing.
    "gemma3_text": dict(
        _COMMON,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"] * (TINY_BLOCKS // 2),
        query_pre_attn_scalar=16,
    ),
}


def calibration_text(chars: int = 200_000) -> str:
    return WIKI_VALID.read_text(encoding="utf-8")[:chars]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """A 384-token BPE trained on WikiText validation text, so tiny models stay tiny."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([calibration_text(100_000)], trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def build_tiny_model(model_type: str, folder: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY_CONFIGS[model_type], **overrides},
    )
    model = AutoModelForCausalLM.from_config(config)
    # Random init makes every block nearly the identity; larger weights give blocks distinct roles.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {mt: build_tiny_model(mt, root / mt, tiny_tokenizer) for mt in TINY_CONFIGS}


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(calibration_text(60_000), encoding="utf-8")
    return path


# Export tests: llama.cpp's converter identifies a BPE tokenizer by its pre-tokenizer hash, so
# models for export carry a real, known tokenizer (SmolLM2's, read from the default GGUF).
EXPORT_OVERRIDES = {"mistral": dict(sliding_window=4096)}  # llama.cpp runs Mistral without a window
SPM_FOR_CONVERTER = ("qwen2", "qwen3")


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from mi_prun.load import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    folder = tmp_path_factory.mktemp("smol_tokenizer")
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build_export_model(model_type: str, folder: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    build_tiny_model(model_type, folder, tokenizer, seed, vocab_size=len(tokenizer), **{**EXPORT_OVERRIDES.get(model_type, {}), **overrides})
    # transformers 5 swaps in the model family's own tokenizer class (Qwen's regex pre-tokenizer for
    # qwen2/qwen3) unless told to use tokenizer.json as it is; a Llama class with a ByteLevel
    # tokenizer.json does that, so SmolLM2's tokenizer stays SmolLM2's under every architecture.
    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "LlamaTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2))
    if model_type in SPM_FOR_CONVERTER:
        # ...but not for qwen2/qwen3, which transformers 5 always loads as Qwen2Tokenizer, whose
        # pre-tokenizer hash the converter cannot know for SmolLM2's vocabulary. Their converter
        # tries a SentencePiece tokenizer.model first: give it one, so the weights still convert.
        write_sentencepiece_model(folder / "tokenizer.model")
    return folder


def write_sentencepiece_model(path: Path) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(calibration_text(100_000).splitlines()), model_prefix=str(path.with_suffix("")),
        vocab_size=512, model_type="bpe", minloglevel=2,
    )


@pytest.fixture(scope="session")
def export_models(tmp_path_factory, smol_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_models")
    return {mt: build_export_model(mt, root / mt, smol_tokenizer) for mt in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_q8_0_gguf(export_models, tmp_path_factory) -> Path:
    """The tiny llama as a Q8_0 GGUF, converted once: a source the builds read, never write."""
    from mi_prun.runtimes.formats import GGUFType
    from mi_prun.runtimes.gguf_export import export_gguf

    root = tmp_path_factory.mktemp("tiny_q8_0_gguf")
    src = root / "tiny.q8_0.gguf"
    export_gguf(export_models["llama"], src, GGUFType.q8_0, root)
    return src


# The architectures a per-architecture check runs on in `make test`; the others run in `make test-slow`
# (llama: the plain layout; gemma3_text: post-norms, sliding windows, per-layer config lists).
FAST_ARCHS = ("llama", "gemma3_text")


def archs_fast_first(archs) -> list:
    """Parametrize values: FAST_ARCHS as they are, the others marked slow."""
    return [a if a in FAST_ARCHS else pytest.param(a, marks=pytest.mark.slow) for a in archs]
