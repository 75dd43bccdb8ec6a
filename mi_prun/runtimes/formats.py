"""The output formats as data: targets, llama.cpp types and ONNX precisions.

Torch-free and numpy-free, so that the plan (and the CLI's --help) can name them without loading
the runtime modules that write them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Target(str, Enum):
    gguf = "gguf"
    onnx = "onnx"


class GGUFType(str, Enum):
    f32 = "f32"
    f16 = "f16"
    q8_0 = "q8_0"
    q6_k = "q6_k"
    q5_k_m = "q5_k_m"
    q4_k_m = "q4_k_m"
    q4_1 = "q4_1"
    q4_0 = "q4_0"


@dataclass(frozen=True)
class GGUFTypeInfo:
    converter_outtype: str  # what the converter writes; llama.cpp quantizes it when it is not the type itself
    llama_ftype: str  # llama.cpp's name for the type (the quantizer's target)


GGUF_TYPES: dict[GGUFType, GGUFTypeInfo] = {
    GGUFType.f32: GGUFTypeInfo("f32", "LLAMA_FTYPE_ALL_F32"),
    GGUFType.f16: GGUFTypeInfo("f16", "LLAMA_FTYPE_MOSTLY_F16"),
    GGUFType.q8_0: GGUFTypeInfo("f16", "LLAMA_FTYPE_MOSTLY_Q8_0"),
    GGUFType.q6_k: GGUFTypeInfo("f16", "LLAMA_FTYPE_MOSTLY_Q6_K"),
    GGUFType.q5_k_m: GGUFTypeInfo("f16", "LLAMA_FTYPE_MOSTLY_Q5_K_M"),
    GGUFType.q4_k_m: GGUFTypeInfo("f16", "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    GGUFType.q4_1: GGUFTypeInfo("f16", "LLAMA_FTYPE_MOSTLY_Q4_1"),
    GGUFType.q4_0: GGUFTypeInfo("f16", "LLAMA_FTYPE_MOSTLY_Q4_0"),
}


class CompensatedType(str, Enum):
    """The GGUF type of the tensors compensation rewrites in a GGUF pruned in place. auto: the
    tensor's own type when it has 8 bits or more, else Q8_0 (docs/method.md, decisions)."""

    auto = "auto"
    same = "same"  # the tensor's own type in the source
    q8_0 = "q8_0"
    f16 = "f16"


class OnnxPrecision(str, Enum):
    fp32 = "fp32"
    int4 = "int4"
