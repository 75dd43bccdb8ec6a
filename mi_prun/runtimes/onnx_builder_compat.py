"""Run onnxruntime-genai's model builder under transformers 5, with the shims it needs.

    python -m mi_prun.runtimes.onnx_builder_compat <model builder arguments>

Gemma 3: transformers 5 keeps the rope thetas per layer type (`rope_parameters["full_attention"]`,
`["sliding_attention"]`) and dropped `rope_local_base_freq`; the builder (0.18) still reads a flat
`rope_parameters["rope_type"]` and `config.rope_local_base_freq`. The caller stages a config with
flat keys added (`builder_config`), and this module supplies the attribute from the nested entry.
Each shim is keyed by model type and checked by the export parity tests.
"""

from __future__ import annotations

import copy
import runpy
import sys


def _flat_rope(config: dict) -> dict:
    """Add the builder's flat rope keys (global layers' values) beside the per-layer-type ones."""
    out = copy.deepcopy(config)
    nested = out.get("rope_parameters") or {}
    if "full_attention" in nested and "rope_type" not in nested:
        out["rope_parameters"] = {**nested["full_attention"], **nested}
    return out


# model_type -> config.json rewrite for the builder's staged copy
CONFIG_SHIMS = {"gemma3_text": _flat_rope}


def builder_config(config: dict) -> dict | None:
    shim = CONFIG_SHIMS.get(config.get("model_type"))
    return shim(config) if shim else None


def _patch_classes() -> None:
    from transformers import Gemma3TextConfig

    if "rope_local_base_freq" not in dir(Gemma3TextConfig):
        Gemma3TextConfig.rope_local_base_freq = property(
            lambda self: self.rope_parameters["sliding_attention"]["rope_theta"]
        )


if __name__ == "__main__":
    _patch_classes()
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
