"""Torch dequantization (mi_prun/dequant.py) against gguf-py's numpy, bit for bit, per type."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants

from mi_prun import dequant

# Types gguf-py can quantize: real encodings of random weights. The K-types it only decodes: random
# bytes, with every float16 field made a finite scale (random bits would be NaN or inf at times).
QUANTIZABLE = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16, Q.BF16]
# Byte offsets of float16 fields within a block of each K-type.
K_HALF_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def encoded(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if qtype in QUANTIZABLE:
        values = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3.0, (rows, 1))).astype(np.float32)
        return quants.quantize(values, qtype)
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // 256, type_size), dtype=np.uint8)
    for offset in K_HALF_FIELDS[qtype]:
        blocks[:, offset : offset + 2] = rng.uniform(-0.05, 0.05, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", QUANTIZABLE + list(K_HALF_FIELDS), ids=lambda q: q.name)
def test_dequantize_equals_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = encoded(qtype, 48, 512, rng)
    expected = quants.dequantize(raw, qtype)
    got = dequant.dequantize(torch.from_numpy(raw.view(np.uint8).copy()), qtype, expected.shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    # Bit patterns, not values: -0.0 against 0.0 or a NaN would pass a value comparison.
    assert np.array_equal(got.numpy().view(np.int32), expected.view(np.int32))


def test_chunks_do_not_change_values(monkeypatch):
    rng = np.random.default_rng(1)
    raw = torch.from_numpy(encoded(Q.Q4_K, 8, 1024, rng).copy())
    whole = dequant.dequantize(raw, Q.Q4_K, (8, 1024))
    monkeypatch.setattr(dequant, "CHUNK_VALUES", 3 * 256)  # 3 blocks a chunk: chunks end mid-row
    assert torch.equal(dequant.dequantize(raw, Q.Q4_K, (8, 1024)), whole)
