"""Paged absorbed-MLA decode attention: a Triton kernel and its plain-PyTorch reference.

For each query token t (at position p_t, in sequence b_t) and head h:
    s_j   = (q_latent[t,h] . c_j + q_rot[t,h] . kr_j) * scale      for the keys j = 0..p_t of b_t
    o[t,h] = sum_j softmax(s)_j c_j                                   (B*S, H, d_c), before W_UV
with [c_j ; kr_j] read in place from the paged pool through b_t's block table.

The kernel gives each program BLOCK_H heads of one query token, so every latent row it reads
serves BLOCK_H heads at once (MLA's keys are shared by all heads: the read, not the math, is the
cost). Programs for the heads of one token are adjacent in the grid and share the rows in L2.
When the batch is too small to fill the GPU, the context is split over NUM_SPLITS programs whose
partial (max, sum, weighted rows) are merged afterwards (flash-decoding).
"""

from __future__ import annotations

import torch

from moeco.triton_support import HAVE_TRITON, available

if HAVE_TRITON:
    import triton
    import triton.language as tl


def paged_mla_decode_reference(q_latent, q_rot, pool, block_tables, positions, scale, block_size):
    """Gather each row's blocks, then attend: the definition the kernel is tested against."""
    B, S, H, C = q_latent.shape
    nb = block_tables.shape[1]
    rows = pool.view(-1, block_size, pool.shape[-1])[block_tables].view(B, nb * block_size, -1).float()
    c, kr = rows[..., :C], rows[..., C:]
    s = (torch.einsum("bshc,btc->bsht", q_latent.float(), c)
         + torch.einsum("bshr,btr->bsht", q_rot.float(), kr)) * scale
    k = torch.arange(nb * block_size, device=pool.device)
    ok = k[None, None, :] <= positions[..., None]
    s = s.masked_fill(~ok[:, :, None, :], float("-inf"))
    p = torch.nan_to_num(s.softmax(-1))  # rows with no keys (padding) give 0
    return torch.einsum("bsht,btc->bshc", p, c)


if HAVE_TRITON:
    @triton.jit
    def _decode_kernel(ql_ptr, qr_ptr, pool_ptr, bt_ptr, pos_ptr, acc_ptr, ml_ptr, scale,
                       H, C, R, S, stride_bt, NUM_SPLITS,
                       C_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_N: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr):
        hb, t, split = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
        b = t // S
        n_keys = tl.maximum(tl.load(pos_ptr + t) + 1, 0)
        per_split = tl.cdiv(tl.cdiv(n_keys, BLOCK_N), NUM_SPLITS) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, n_keys)
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = heads < H
        cc, rr = tl.arange(0, C_PAD), tl.arange(0, R_PAD)
        q = tl.load(ql_ptr + (t * H + heads[:, None]) * C + cc[None, :], mask=hm[:, None] & (cc[None, :] < C), other=0.0)
        qr = tl.load(qr_ptr + (t * H + heads[:, None]) * R + rr[None, :], mask=hm[:, None] & (rr[None, :] < R), other=0.0)
        m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, C_PAD), tl.float32)
        row = C + R
        for k0 in range(start, end, BLOCK_N):
            offs = k0 + tl.arange(0, BLOCK_N)
            km = offs < end
            page = tl.load(bt_ptr + b * stride_bt + offs // PAGE, mask=km, other=0).to(tl.int64)
            slot = page * PAGE + offs % PAGE
            kv = tl.load(pool_ptr + slot[:, None] * row + cc[None, :], mask=km[:, None] & (cc[None, :] < C), other=0.0)
            kr = tl.load(pool_ptr + slot[:, None] * row + C + rr[None, :], mask=km[:, None] & (rr[None, :] < R),
                         other=0.0)
            if IEEE:  # float32 pools (tests): no TF32 rounding
                s = tl.dot(q, tl.trans(kv), input_precision="ieee") + tl.dot(qr, tl.trans(kr), input_precision="ieee")
            else:
                s = tl.dot(q.to(kv.dtype), tl.trans(kv)) + tl.dot(qr.to(kr.dtype), tl.trans(kr))
            s = tl.where(km[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l = l * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, kv, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)
            m = m_new
        out = (t * NUM_SPLITS + split) * H + heads
        tl.store(acc_ptr + out[:, None] * C + cc[None, :], acc, mask=hm[:, None] & (cc[None, :] < C))
        tl.store(ml_ptr + out * 2, m, mask=hm)
        tl.store(ml_ptr + out * 2 + 1, l, mask=hm)


def _num_splits(tokens: int, head_blocks: int) -> int:
    """Enough programs to fill ~2 waves of a big GPU, at most 32 splits of the context.

    A function of the batch shape only, not of the context length: each split's share of the keys
    is worked out in the kernel, so a captured CUDA graph and an eager call at the same batch size
    split (and sum) identically.
    """
    return max(1, min(32, -(-264 // max(tokens * head_blocks, 1))))


def paged_mla_decode(q_latent, q_rot, pool, block_tables, positions, scale, block_size, num_splits=None,
                     block_h: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                     num_stages: int = 2):
    """o_latent (B, S, H, d_c) in float32; the Triton kernel where it runs, else the reference."""
    if q_latent.numel() == 0:  # a forward of no tokens (an idle expert-parallel rank): no grid to launch
        return q_latent.new_zeros(q_latent.shape, dtype=torch.float32)
    if not available(pool.device):
        return paged_mla_decode_reference(q_latent, q_rot, pool, block_tables, positions, scale, block_size)
    B, S, H, C = q_latent.shape
    R = q_rot.shape[-1]
    T = B * S
    # tile sizes from a sweep at V3's shapes on an H200 (bench/serve_profile.py): 64 heads x 32 keys
    # with 8 warps when there are that many heads, else 16 heads with 4 warps
    BLOCK_H = block_h or (64 if H >= 64 else 16)
    BLOCK_N = block_n or (32 if block_size >= 32 else 16)
    num_warps = num_warps or (8 if BLOCK_H >= 64 else 4)
    head_blocks = -(-H // BLOCK_H)
    if num_splits is None:
        num_splits = _num_splits(T, head_blocks)
    ql = q_latent.reshape(T, H, C).contiguous()
    qr = q_rot.reshape(T, H, R).contiguous()
    acc = torch.empty(T, num_splits, H, C, dtype=torch.float32, device=pool.device)
    ml = torch.empty(T, num_splits, H, 2, dtype=torch.float32, device=pool.device)
    pos = positions.reshape(T).contiguous()
    _decode_kernel[(head_blocks, T, num_splits)](
        ql, qr, pool, block_tables, pos, acc, ml, scale, H, C, R, S, block_tables.stride(0), num_splits,
        C_PAD=max(16, triton.next_power_of_2(C)), R_PAD=max(16, triton.next_power_of_2(R)),
        BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, PAGE=block_size, IEEE=pool.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    if num_splits == 1:
        out = acc[:, 0] / ml[:, 0, :, 1:].clamp_min(1e-30)
    else:
        m, l = ml[..., 0], ml[..., 1]
        top = m.amax(1, keepdim=True)
        w = torch.exp(m - torch.where(torch.isinf(top), torch.zeros_like(top), top))  # empty splits weigh 0
        out = (acc * w[..., None]).sum(1) / (l * w).sum(1)[..., None].clamp_min(1e-30)
    return out.view(B, S, H, C)
