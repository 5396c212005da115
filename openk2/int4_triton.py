"""Fused INT4 MoE decode on CUDA (Triton): routed experts of a few tokens, read straight from the
checkpoint's packed words, with no host synchronisation.

Why: at decode a K2 MoE layer sends one token to 8 experts. The grouped path in openk2.quant (tokens
sorted by expert on the host, one tinygemm call per expert) pays a host sync and ~50 launches per
layer, which on an H200 cost 4.5x the bf16 matmuls themselves (bench/cuda_speed.py). Here each
(token, expert) pair is a "slot"; one launch computes a projection for all slots: program (slot,
block of outputs) reads its expert id from the device, then walks the input dimension, unpacking
eight nibbles per int32 word (lowest first, stored +8, as compressed-tensors packs them) and scaling
each group of 32 by its bf16 scale. Weight bytes are read once per slot, so this wins while slots are
few (decode); prefill keeps the grouped path. The launch sequence has no host sync, so a decode step
can be captured in a CUDA graph.

Importable without Triton (CPU builds of torch ship none): AVAILABLE says whether it runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch: the grouped path serves
    triton = tl = None

AVAILABLE = triton is not None
BLOCK_N, NUM_WARPS, MAX_BLOCK_K = 4, 1, 512  # the fastest of a 36-tile sweep on an H200 (docs/results.md)
MAX_SLOTS = 256  # (token, expert) pairs; prefill beyond it keeps the grouped path. Measured: 128 slots fused 2.5x grouped


def _block_k(k: int, group_size: int) -> int | None:
    """Input columns per loop step: the largest up to MAX_BLOCK_K that divides K."""
    return next((b for b in (512, 256, 128, 64, 32) if b <= MAX_BLOCK_K and k % b == 0 and b % group_size == 0), None)


def supported(x: torch.Tensor, dim: int, inter: int, group_size: int) -> bool:
    return (AVAILABLE and x.is_cuda and _block_k(dim, group_size) is not None
            and _block_k(inter, group_size) is not None)


if AVAILABLE:
    @triton.jit
    def _w4_gemv(x_ptr, w_ptr, s_ptr, idx_ptr, y_ptr, N, K, row_div,
                 stride_we, stride_wn, stride_se, stride_sn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
        """y[slot, n] = sum_k x[slot // row_div, k] * W[idx[slot], n, k], W unpacked from INT4."""
        slot = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        e = tl.load(idx_ptr + slot).to(tl.int64)
        row = (slot // row_div).to(tl.int64)
        w_base = w_ptr + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
        s_base = s_ptr + e * stride_se + offs_n[:, None].to(tl.int64) * stride_sn
        shifts = tl.arange(0, 8) * 4
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * K + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
            words = tl.load(w_base + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :], mask=mask_n[:, None], other=0)
            q = ((words[:, :, None] >> shifts[None, None, :]) & 0xF).to(tl.float32) - 8.0  # [BN, BK/8, 8]
            s = tl.load(s_base + (k0 // GROUP + tl.arange(0, BLOCK_K // GROUP))[None, :], mask=mask_n[:, None],
                        other=0).to(tl.float32)
            w = tl.reshape(tl.reshape(q, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * s[:, :, None], (BLOCK_N, BLOCK_K))
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(y_ptr + slot * N + offs_n, acc, mask=mask_n)


def _project(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor, row_div: int,
             group_size: int) -> torch.Tensor:
    """x [rows, K], packed int32 [E, N, K/8], scale [E, N, K/g], idx [slots] -> fp32 [slots, N]."""
    slots, (_, n, _) = idx.numel(), packed.shape
    k = x.shape[1]
    y = torch.empty(slots, n, device=x.device, dtype=torch.float32)
    grid = (slots, triton.cdiv(n, BLOCK_N))
    _w4_gemv[grid](x, packed, scale, idx, y, n, k, row_div, packed.stride(0), packed.stride(1),
                   scale.stride(0), scale.stride(1), BLOCK_N=BLOCK_N, BLOCK_K=_block_k(k, group_size), GROUP=group_size,
                   num_warps=NUM_WARPS)
    return y


def moe_decode(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, pairs, group_size: int) -> torch.Tensor:
    """Routed experts of N tokens: x [N, D], indices/weights [N, k]; pairs: (packed, scale) of gate, up
    and down, [E, out, in/8] int32 and [E, out, in/g] bf16 (Int4Experts.pairs(), unchanged)."""
    gate, up, down = pairs
    n_tok, k = indices.shape
    x = x.contiguous()
    idx = indices.reshape(-1).contiguous()
    g = _project(x, *gate, idx, k, group_size)
    u = _project(x, *up, idx, k, group_size)
    h = F.silu(g) * u
    y = _project(h, *down, idx, 1, group_size)
    return (y.view(n_tok, k, -1) * weights.to(torch.float32).unsqueeze(-1)).sum(1).to(x.dtype)
