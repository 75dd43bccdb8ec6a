"""GGUF dequantization in torch, on the compute device.

The same arithmetic as gguf-py's numpy dequantizers (`gguf.quants`), operation for operation in
float32, so the values are bit-identical to theirs (tests hold it for every type below); what
changes is where it runs: on the GPU a block's weights are dequantized where they are used, and
on the CPU torch's kernels use every thread where numpy's use one. A type not in the table
falls back to gguf-py (`supported` says which are here). No library keeps such a table for
torch (checked: PyPI has MLX and CUDA-kernel packages, none for torch tensors).

Every function takes a tensor's blocks as bytes, (n_blocks, type_size) uint8, on any device, and
returns (n_blocks, block_size) float32 on that device.
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

QK_K = 256


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 fields (n, 2) uint8 -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Low then high nibbles of each group of `width` bytes: (n, groups, 2, width), gguf-py's order."""
    qs = qs.reshape(n, -1, 1, width)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2)


def _bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Bits 0..count-1 of each byte of qh (n, groups, width) as (n, groups, count, width) uint8."""
    shifts = torch.arange(count, dtype=torch.uint8, device=qh.device).reshape(1, 1, count, 1)
    return (qh.unsqueeze(2) >> shifts) & 1


def q4_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    qs = _nibbles(b[:, 2:], n, 16).reshape(n, -1).to(torch.int8) - 8
    return d * qs.float()


def q4_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    qs = _nibbles(b[:, 4:], n, 16).reshape(n, -1).float()
    return (d * qs) + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """The fifth bit of each of 32 values, from a little-endian uint32 per block."""
    word = qh.contiguous().view(torch.int32).reshape(-1, 1)
    shifts = torch.arange(32, dtype=torch.int32, device=qh.device).reshape(1, 32)
    return ((word >> shifts) & 1).to(torch.uint8)


def q5_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    ql = _nibbles(b[:, 6:], n, 16).reshape(n, -1)
    qs = (ql | (_q5_high(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * qs.float()


def q5_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    ql = _nibbles(b[:, 8:], n, 16).reshape(n, -1)
    qs = (ql | (_q5_high(b[:, 4:8]) << 4)).float()
    return (d * qs) + m


def q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    x = b[:, 2:].contiguous().view(torch.int8).float()
    return x * d


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: eight 6-bit scales and mins packed in 12 bytes (gguf-py's Q4_K.get_scale_min)."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0:1], s[:, 1:2], s[:, 2:3]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k_scale_min(b[:, 4:16])
    d = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * m.float()).reshape(n, -1, 1)
    qs = _nibbles(b[:, 16:], n, 32).reshape(n, -1, 32).float()
    return (d * qs - dm).reshape(n, QK_K)


def q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k_scale_min(b[:, 4:16])
    qh, qs = b[:, 16 : 16 + QK_K // 8], b[:, 16 + QK_K // 8 :]
    d = (d * sc.float()).reshape(n, -1, 1)
    dm = (dmin * m.float()).reshape(n, -1, 1)
    ql = _nibbles(qs, n, 32).reshape(n, -1, 32)
    high = _bits(qh.reshape(n, 1, 32), 8).reshape(n, -1, 32)
    q = (ql | (high << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, : QK_K // 2], b[:, QK_K // 2 : QK_K // 2 + QK_K // 4]
    scales = b[:, QK_K // 2 + QK_K // 4 : QK_K // 2 + QK_K // 4 + QK_K // 16]
    d = _f16(b[:, -2:])
    d = (d * scales.contiguous().view(torch.int8).float()).reshape(n, QK_K // 16, 1)
    low = _nibbles(ql, n, 64).reshape(n, -1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).reshape(1, 1, 4, 1)
    high = ((qh.reshape(n, -1, 1, 32) >> shifts) & 0x03).reshape(n, -1, 32)
    q = (low | (high << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, QK_K // 16, -1).float()).reshape(n, QK_K)


def bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float().reshape(b.shape[0], -1)


def f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float().reshape(b.shape[0], -1)


def f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32).reshape(b.shape[0], -1)


# Per type: the function of its blocks. F32/F16/BF16 take one element as a block.
DEQUANTIZERS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: f32, Q.F16: f16, Q.BF16: bf16,
    Q.Q4_0: q4_0, Q.Q4_1: q4_1, Q.Q5_0: q5_0, Q.Q5_1: q5_1, Q.Q8_0: q8_0,
    Q.Q4_K: q4_k, Q.Q5_K: q5_k, Q.Q6_K: q6_k,
}

# Blocks dequantized at a time: float32 output and the few same-sized temporaries of the integer
# steps stay within about 64 MB per chunk (a 7B model's embedding would otherwise need gigabytes).
CHUNK_VALUES = 16 * 2**20


def supported(qtype: Q) -> bool:
    return qtype in DEQUANTIZERS


def dequantize(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor's bytes (uint8, any shape, on any device) as float32 of `shape` (numpy order, the
    reader's `t.data.shape` with the last axis in values), on the same device."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    fn = DEQUANTIZERS[qtype]
    out = torch.empty(blocks.shape[0], block_size, dtype=torch.float32, device=raw.device)
    step = max(1, CHUNK_VALUES // block_size)
    for start in range(0, blocks.shape[0], step):
        out[start : start + step] = fn(blocks[start : start + step])
    return out.reshape(shape)
