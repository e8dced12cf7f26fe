"""The MoE combine as one gather-and-weighted-sum, forward and backward (Triton on CUDA).

    out[t] = sum_k w[t, k] * y[inverse[t K + k]]          y (C, D): expert outputs, sorted by expert

`moe.weighted_combine` in plain PyTorch gathers y back to token order as a (T, K, D) copy,
multiplies it by the weights (a broadcast, so a non-vectorized kernel) and sums over K: three passes
over T K D values and two (T, K, D) intermediates. The kernels here read y once and write (T, D);
the backward writes grad_y (C, D) and the weights' gradient in one pass over grad_out and y.
Products and sums are in FP32, rounded once to y's dtype (the PyTorch path rounds each product to
y's dtype first); the weights are rounded to y's dtype first in both, as the model always did.
"""

from __future__ import annotations

import torch

from moeco.triton_support import HAVE_TRITON, available, interpreting

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _combine_fwd_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, D, stride_y, stride_o, K: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for k in tl.static_range(K):
            c = tl.load(inv_ptr + t * K + k).to(tl.int64)
            w = tl.load(w_ptr + t * K + k).to(y_ptr.dtype.element_ty).to(tl.float32)
            acc += w * tl.load(y_ptr + c * stride_y + d, mask=dm, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * stride_o + d, acc.to(out_ptr.dtype.element_ty), mask=dm)

    @triton.jit
    def _combine_bwd_kernel(g_ptr, y_ptr, order_ptr, w_ptr, gy_ptr, gw_ptr, D, stride_g, stride_y, stride_gy,
                            K: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program per row c of y: it is (token, slot) = divmod(order[c], K).
        c = tl.program_id(0).to(tl.int64)
        tk = tl.load(order_ptr + c).to(tl.int64)
        t = tk // K
        w = tl.load(w_ptr + tk).to(y_ptr.dtype.element_ty).to(tl.float32)
        dot = tl.zeros((BLOCK_D,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            g = tl.load(g_ptr + t * stride_g + d, mask=dm, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + c * stride_y + d, mask=dm, other=0.0).to(tl.float32)
            tl.store(gy_ptr + c * stride_gy + d, (w * g).to(gy_ptr.dtype.element_ty), mask=dm)
            dot += g * y
        tl.store(gw_ptr + tk, tl.sum(dot, axis=0).to(gw_ptr.dtype.element_ty))


def combine_reference(y_CD: torch.Tensor, weights_TK: torch.Tensor, order: torch.Tensor,
                      inverse: torch.Tensor) -> torch.Tensor:
    """The plain PyTorch combine (autograd through index_select): the definition the kernels meet."""
    T, K = weights_TK.shape
    y_TKD = y_CD.index_select(0, inverse).view(T, K, y_CD.shape[-1])
    return (y_TKD * weights_TK.to(y_CD.dtype).unsqueeze(-1)).sum(dim=1)


class _CombineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_CD, weights_TK, order, inverse):
        T, K = weights_TK.shape
        C, D = y_CD.shape
        y = y_CD.contiguous()
        w = weights_TK.contiguous()
        out = torch.empty((T, D), dtype=y.dtype, device=y.device)
        block_d = 64 if interpreting() else 1024
        if T > 0 and D > 0:
            _combine_fwd_kernel[(T, triton.cdiv(D, block_d))](y, inverse, w, out, D, y.stride(0), out.stride(0),
                                                              K=K, BLOCK_D=block_d)
        ctx.save_for_backward(y, w, order)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, w, order = ctx.saved_tensors
        g = grad_out.contiguous()
        C, D = y.shape
        K = w.shape[1]
        gy = torch.empty_like(y)
        gw = torch.empty(w.shape, dtype=torch.float32, device=w.device)
        block_d = 64 if interpreting() else 512
        if C > 0 and D > 0:
            _combine_bwd_kernel[(C,)](g, y, order, w, gy, gw, D, g.stride(0), y.stride(0), gy.stride(0), K=K,
                                      BLOCK_D=block_d)
        elif C > 0:
            gw.zero_()
        return gy, gw.to(w.dtype), None, None


def fused(y_CD: torch.Tensor, weights_TK: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """out (T, D) = sum_k weights[t, k] * y[inverse[t K + k]] by the Triton kernels (autograd included), on
    any device Triton runs on; `order` is inverse's inverse permutation. `moe.weighted_combine` takes
    it on CUDA outside torch.compile (where Inductor fuses the PyTorch combine itself)."""
    return _CombineFn.apply(y_CD, weights_TK, order, inverse)


__all__ = ["combine_reference", "fused"]
