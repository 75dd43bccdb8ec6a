import pytest

from mi_prun.archs import REGISTRY, spec_for, supported_model_types
from mi_prun.errors import UserError
from mi_prun.load import default_model_path, pick_dtype, resolve_source

from .conftest import TINY_BLOCKS


def test_source_kinds(tmp_path):
    default = resolve_source(None)
    assert default.kind == "gguf" and default.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert default_model_path().stat().st_size > 50_000_000
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_source(str(folder)).kind == "folder"
    with pytest.raises(UserError, match="not found"):
        resolve_source("./relative/missing")


def test_registry_is_data_for_every_supported_family(tiny_models):
    """Each row's paths name real modules of transformers' own model, and its GGUF arch is one llama.cpp knows."""
    import gguf
    from transformers import AutoModelForCausalLM

    from mi_prun.archs import blocks, get_path

    assert supported_model_types() == ["gemma3_text", "llama", "mistral", "qwen2", "qwen3"]
    for model_type, spec in REGISTRY.items():
        assert spec.gguf_arch in gguf.MODEL_ARCH_NAMES.values(), model_type
        model = AutoModelForCausalLM.from_pretrained(tiny_models[model_type])
        layers = blocks(model, spec)
        assert len(layers) == TINY_BLOCKS, model_type
        for i, layer in enumerate(layers):
            assert all(get_path(layer, attr) == i for attr in spec.layer_index_attrs), (model_type, i)
    with pytest.raises(ValueError, match="supported: gemma3_text, llama"):
        spec_for("gpt2")


def test_dtype_choice():
    import torch

    assert pick_dtype("auto", torch.device("cpu")) is torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(UserError, match="unknown dtype"):
        pick_dtype("int3", torch.device("cpu"))
