"""Triton kernels against their PyTorch references: CPU under TRITON_INTERPRET=1, or CUDA.

Skipped where Triton is not installed. The interpreter is slow (~ms per tl.dot), so shapes are tiny.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import
pytest.importorskip("triton")

from moeco.fp8 import triton_kernels  # noqa: E402
from moeco.fp8.grouped_wgrad import fp8_grouped_wgrad  # noqa: E402
from moeco.fp8.gemm import fp8_gemm_reference  # noqa: E402
from moeco.fp8.quantize import (  # noqa: E402
    quantize_act_1x128,
    quantize_act_1x128_reference,
    quantize_weight_128x128,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_kernels.interpreting():
    pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)


def _bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("shape", [(8, 256), (5, 200), (2, 3, 130), (13, 700)])
@pytest.mark.parametrize("pow2", [False, True])
def test_triton_act_quant_is_bit_exact(shape, pow2):
    gen = torch.Generator().manual_seed(sum(shape) + pow2)
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 3, shape[-1])
    x[..., :3] = 0  # exact zeros, and an all-zero row
    x[..., 3] = -0.0  # -0 stays -0 (the interpreter emulates the cast)
    x.view(-1, shape[-1])[0] = 0
    x = x.to(DEVICE)
    q, s = triton_kernels.quantize_act_1x128(x, pow2_scale=pow2)
    q_ref, s_ref = quantize_act_1x128_reference(x, pow2_scale=pow2)
    assert torch.equal(s.contiguous(), s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))


def test_triton_act_quant_row_blocks_first_past_the_grid_limit(monkeypatch):
    """More row blocks than the grid's y dimension takes: the kernel walks rows on x instead (the same bits)."""
    monkeypatch.setattr(triton_kernels, "_MAX_GRID_Y", 2)
    x = (torch.randn(37, 700, generator=torch.Generator().manual_seed(3)) * 5).to(DEVICE)
    q, s = triton_kernels.quantize_act_1x128(x)
    q_ref, s_ref = quantize_act_1x128_reference(x)
    assert torch.equal(s.contiguous(), s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))


@pytest.mark.parametrize("shape", [(200, 136), (2, 130, 256)])
@pytest.mark.parametrize("pow2", [False, True])
def test_triton_weight_quant_is_bit_exact(shape, pow2):
    from moeco.fp8.quantize import quantize_weight_128x128_reference

    gen = torch.Generator().manual_seed(sum(shape) + pow2)
    w = torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[-1])
    w[..., :128, :128] = 0  # an all-zero block
    w = w.to(DEVICE)
    q, s, qt = triton_kernels.quantize_weight_128x128(w, pow2_scale=pow2, transposed=True)
    q_ref, s_ref = quantize_weight_128x128_reference(w, pow2_scale=pow2)
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.equal(_bits(qt), _bits(q_ref.transpose(-1, -2).contiguous()))


@pytest.mark.parametrize("from_fp8", [False, True])
@pytest.mark.parametrize("trans_store", [False, True])
@pytest.mark.parametrize("C", [48, 300])
def test_triton_quant_along_tokens_is_bit_exact(from_fp8, trans_store, C):
    """C = 300: three 1x128 blocks of x's scales (the last partial) under tiles of fewer channels."""
    gen = torch.Generator().manual_seed(7 + C)
    x = (torch.randn(300, C, generator=gen) * torch.logspace(-2, 2, C)).to(DEVICE)
    if from_fp8:
        xq, xs = quantize_act_1x128_reference(x)
        q, s = triton_kernels.quantize_act_1x128_t(xq, xs, trans_store=trans_store)
        xd = (xq.float() * xs.repeat_interleave(128, -1)[:, :C])
        q_ref, s_ref = quantize_act_1x128_reference(xd.t().contiguous())
    else:
        q, s = triton_kernels.quantize_act_1x128_t(x, trans_store=trans_store)
        q_ref, s_ref = quantize_act_1x128_reference(x.t().contiguous())
    assert q.shape == (C, 300) and s.shape == (C, 3)
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))


@pytest.mark.parametrize("from_fp8", [False, True])
def test_triton_quant_along_tokens_through_a_row_map(from_fp8):
    """rows[t] picks the source row of output token t (-1: zeros): the same bits as quantizing the
    gathered, zero-padded copy, which the grouped Wgrad no longer builds."""
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(150, 40, generator=gen) * 2).to(DEVICE)
    rows = torch.full((300,), -1, dtype=torch.int32)
    rows[3:53] = torch.arange(0, 50, dtype=torch.int32)  # a tile mixing padding and rows
    rows[128:228] = torch.arange(50, 150, dtype=torch.int32)
    rows = rows.to(DEVICE)
    if from_fp8:
        xq, xs = quantize_act_1x128_reference(x)
        xs = xs.t().contiguous().t()  # the forward's outer-dim-major scales
        q, s = triton_kernels.quantize_act_1x128_t(xq, xs, rows=rows)
        xd = xq.float() * xs.repeat_interleave(128, -1)[:, :40]
    else:
        q, s = triton_kernels.quantize_act_1x128_t(x, rows=rows)
        xd = x.float()
    padded = torch.zeros(300, 40, device=xd.device)
    ok = rows >= 0
    padded[ok] = xd[rows[ok].long()]
    q_ref, s_ref = quantize_act_1x128_reference(padded.t().contiguous())
    assert q.shape == (40, 300) and s.shape == (40, 3)
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))


@pytest.mark.parametrize("M,N,K,b_tiles", [(16, 32, 256, False), (20, 40, 200, False), (16, 24, 256, True)])
def test_triton_gemm_matches_reference(M, N, K, b_tiles):
    gen = torch.Generator().manual_seed(M + N + K)
    a, b = torch.randn(M, K, generator=gen).to(DEVICE), torch.randn(N, K, generator=gen).to(DEVICE)
    aq, sa = quantize_act_1x128(a)
    bq, sb = quantize_act_1x128(b) if b_tiles else quantize_weight_128x128(b)
    out = triton_kernels.fp8_gemm_nt(aq, sa, bq, sb, torch.float32)
    ref = fp8_gemm_reference(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), torch.float32)
    # Interpreter: the same FP8 products and promotion, only the float32 summation order differs.
    # CUDA: Hopper's limited-precision accumulator inside each 128-deep tl.dot (~2e-4, see
    # test_fp8_gpu.py).
    tol = 1e-5 if DEVICE == "cpu" else 5e-4
    assert ((out.cpu() - ref).abs().max() / ref.abs().max()) < tol
    out_bf16 = triton_kernels.fp8_gemm_nt(aq, sa, bq, sb, torch.bfloat16)
    assert out_bf16.dtype == torch.bfloat16



@pytest.mark.parametrize("M,N,K,b_tiles,persistent", [(20, 48, 272, False, True), (33, 64, 128, True, True),
                                                      (40, 144, 256, False, False)])
def test_triton_tma_gemm_matches_reference(M, N, K, b_tiles, persistent):
    # Ragged M, N and K tiles (TMA reads zeros past the edges and drops writes there), a persistent
    # grid with more tiles than programs, and 1x128 B scales (Wgrad's operands).
    gen = torch.Generator().manual_seed(M + N + K)
    a, b = torch.randn(M, K, generator=gen).to(DEVICE), torch.randn(N, K, generator=gen).to(DEVICE)
    aq, sa = quantize_act_1x128(a)
    bq, sb = quantize_act_1x128(b) if b_tiles else quantize_weight_128x128(b)
    assert triton_kernels.tma_gemm_ok(aq, bq, torch.float32)
    out = triton_kernels.fp8_gemm_nt_tma(aq, sa, bq, sb, torch.float32, persistent=persistent)
    ref = fp8_gemm_reference(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), torch.float32)
    tol = 1e-5 if DEVICE == "cpu" else 5e-4
    assert ((out.cpu() - ref).abs().max() / ref.abs().max()) < tol


# ---- grouped GEMMs for routed experts (one launch for all experts) -----------------------------


def _per_expert(counts, fn, shape):
    """Stack fn(e, r0, r1) over experts with tokens into a zero tensor of `shape` (rows by expert)."""
    out = torch.zeros(shape)
    r0 = 0
    for e, c in enumerate(counts):
        if c:
            out[r0:r0 + c] = fn(e, r0, r0 + c)
        r0 += c
    return out


@pytest.mark.parametrize("counts,tail,N,K", [
    ([5, 0, 19, 3], 4, 40, 200),   # an empty expert, ragged counts, rows past offs[-1], N, K not x128
    ([0, 17, 0], 0, 16, 256),      # empty first and last experts
    ([33], 0, 130, 128),           # one expert, several M tiles, N past one 128 block
])
def test_triton_grouped_gemm_matches_per_expert_reference(counts, tail, N, K):
    gen = torch.Generator().manual_seed(sum(counts) + N + K)
    E, T = len(counts), sum(counts) + tail
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x, w = torch.randn(T, K, generator=gen), torch.randn(E, N, K, generator=gen)
    xq, xs = quantize_act_1x128(x.to(DEVICE))
    wq, ws = quantize_weight_128x128(w.to(DEVICE))
    out = triton_kernels.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs.to(DEVICE), torch.float32).cpu()
    xq, xs, wq, ws = xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu()
    ref = _per_expert(counts, lambda e, a, b: fp8_gemm_reference(xq[a:b], xs[a:b], wq[e], ws[e]), (T, N))
    tol = 1e-5 if DEVICE == "cpu" else 5e-4
    assert ((out - ref).abs().max() / ref.abs().max()) < tol
    assert torch.equal(out[sum(counts):], torch.zeros(tail, N))  # rows past offs[-1]: zeros
    # Dgrad form: B = W_e^T with its blocks transposed (a strided scale view).
    gy = torch.randn(T, N, generator=gen)
    gq, gs = quantize_act_1x128(gy.to(DEVICE))
    out = triton_kernels.fp8_grouped_gemm_nt(gq, gs, wq.to(DEVICE).transpose(1, 2).contiguous(),
                                             ws.to(DEVICE).transpose(1, 2), offs.to(DEVICE), torch.bfloat16)
    assert out.dtype == torch.bfloat16
    gq, gs = gq.cpu(), gs.cpu()
    ref = _per_expert(counts, lambda e, a, b: fp8_gemm_reference(gq[a:b], gs[a:b], wq[e].t().contiguous(),
                                                                 ws[e].t().contiguous()), (T, K))
    assert ((out.float().cpu() - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 output


def test_triton_grouped_wgrad_matches_per_expert_reference():
    from moeco.fp8.quantize import quantize_act_1x128_t

    gen = torch.Generator().manual_seed(3)
    counts, N, K = [5, 0, 140, 3], 24, 136  # an empty expert, one with two 128-token tiles
    E, T = len(counts), sum(counts) + 2
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    gy, x = torch.randn(T, N, generator=gen), torch.randn(T, K, generator=gen)
    xq, xs = quantize_act_1x128(x)
    dw = fp8_grouped_wgrad(gy.to(DEVICE), xq.to(DEVICE), xs.to(DEVICE), offs.to(DEVICE), E).cpu()

    def one(e, a, b):
        gtq, gts = quantize_act_1x128_t(gy[a:b])
        xtq, xts = quantize_act_1x128_t(xq[a:b], xs[a:b])
        return fp8_gemm_reference(gtq, gts, xtq, xts)

    ref = torch.stack([one(e, sum(counts[:e]), sum(counts[:e + 1])) if counts[e] else torch.zeros(N, K)
                       for e in range(E)])
    tol = 1e-5 if DEVICE == "cpu" else 5e-4
    assert ((dw - ref).abs().max() / ref.abs().max()) < tol
    assert torch.equal(dw[1], torch.zeros(N, K))



@pytest.mark.parametrize("counts,tail,N,K", [([5, 0, 19, 3], 4, 48, 272), ([33], 0, 144, 128)])
def test_triton_tma_grouped_gemm_matches_pointer_kernel_and_reference(counts, tail, N, K):
    gen = torch.Generator().manual_seed(sum(counts) + N + K + 1)
    E, T = len(counts), sum(counts) + tail
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEVICE)
    x, w = torch.randn(T, K, generator=gen), torch.randn(E, N, K, generator=gen)
    xq, xs = quantize_act_1x128(x.to(DEVICE))
    wq, ws = quantize_weight_128x128(w.to(DEVICE))
    out = triton_kernels.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs, torch.float32, tma=True).cpu()
    ref = _per_expert(counts, lambda e, a, b: fp8_gemm_reference(xq[a:b].cpu(), xs[a:b].cpu(), wq[e].cpu(),
                                                                 ws[e].cpu()), (T, N))
    tol = 1e-5 if DEVICE == "cpu" else 5e-4
    assert ((out - ref).abs().max() / ref.abs().max()) < tol
    assert torch.equal(out[sum(counts):], torch.zeros(tail, N))
    # Dgrad form (B = W_e^T, scales a transposed view): the TMA and pointer kernels agree.
    gy = torch.randn(T, N, generator=gen)
    gq, gs = quantize_act_1x128(gy.to(DEVICE))
    wt = wq.transpose(1, 2).contiguous()
    got = triton_kernels.fp8_grouped_gemm_nt(gq, gs, wt, ws.transpose(1, 2), offs, torch.float32, tma=True)
    want = triton_kernels.fp8_grouped_gemm_nt(gq, gs, wt, ws.transpose(1, 2), offs, torch.float32, tma=False)
    assert ((got - want).abs().max() / want.abs().max()).item() < tol


def test_triton_tma_grouped_wgrad_matches_pointer_kernel():
    gen = torch.Generator().manual_seed(4)
    counts, N, K = [5, 0, 140, 3], 24, 136
    E, T = len(counts), sum(counts) + 2
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEVICE)
    gy, x = torch.randn(T, N, generator=gen).to(DEVICE), torch.randn(T, K, generator=gen).to(DEVICE)
    xq, xs = quantize_act_1x128(x)
    got = fp8_grouped_wgrad(gy, xq, xs, offs, E, tma=True, gemm="triton")
    want = fp8_grouped_wgrad(gy, xq, xs, offs, E, tma=False, gemm="triton")
    tol = 1e-5 if DEVICE == "cpu" else 5e-4
    assert ((got - want).abs().max() / want.abs().max()).item() < tol
    assert torch.equal(got[1].cpu(), torch.zeros(N, K))


def test_triton_tile_map_bounds():
    offs = torch.tensor([5, 5, 24, 27], dtype=torch.int32)
    m = triton_kernels.grouped_tile_map(offs, 31, 16)
    # groups 0, 2 (two tiles), 3, then the tail (group 4 = E, rows 27..31) and two spare tiles
    assert m.tolist() == [[0, 2, 2, 3, 4, 4, 4], [0, 5, 21, 24, 27, 0, 0], [5, 24, 24, 27, 31, 0, 0]]


@pytest.mark.parametrize("pow2", [False, True])
def test_grouped_fn_triton_matches_loop(pow2):
    import dataclasses

    from moeco.errors import ConfigError
    from moeco.fp8 import Fp8Recipe, fp8_grouped_mm
    from moeco.fp8.compute import grouped_impl

    base = Fp8Recipe(name="fp8-ue8m0", scale_format="ue8m0", weight_scale_format="ue8m0") if pow2 else Fp8Recipe()
    gen = torch.Generator().manual_seed(11 + pow2)
    counts, N, K = [6, 0, 21, 1], 40, 136
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEVICE)
    x0 = torch.randn(sum(counts), K, generator=gen).to(DEVICE)
    w0 = torch.randn(len(counts), N, K, generator=gen).to(DEVICE)
    gy = torch.randn(sum(counts), N, generator=gen).to(DEVICE)
    res = {}
    for mode in ("loop", "triton"):
        recipe = dataclasses.replace(base, grouped_kernel=mode)
        assert grouped_impl(x0.device, "auto", recipe.kernels.grouped) == mode
        assert grouped_impl(x0.device, "auto", recipe.kernels.grouped_wgrad, wgrad=True) == mode
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fp8_grouped_mm(x, w, offs, recipe=recipe)
        y.backward(gy)
        res[mode] = (y.detach(), x.grad, w.grad)
    tol = 1e-5 if DEVICE == "cpu" else 1e-3  # CUDA: scaled_mm per expert vs grouped Triton, ~2e-4 each
    for got, ref in zip(res["triton"], res["loop"]):
        assert ((got - ref).abs().max() / ref.abs().max()).item() < tol
    with pytest.raises(ConfigError, match="Fp8Recipe.grouped_kernel='bogus'"):
        Fp8Recipe(grouped_kernel="bogus")
    with pytest.raises(ValueError, match="grouped_kernel='bogus'"):
        grouped_impl(x0.device, "auto", "bogus")
    assert grouped_impl(torch.device("cpu"), "auto", "auto") == "loop"  # CPU stays on the loop unless forced
    assert grouped_impl(x0.device, "reference", "auto") == "loop"  # an explicit per-GEMM backend keeps the loop
    kernels = Fp8Recipe(grouped_kernel="triton", grouped_wgrad_kernel="loop").kernels
    assert grouped_impl(x0.device, "auto", kernels.grouped) == "triton"
    assert grouped_impl(x0.device, "auto", kernels.grouped_wgrad, wgrad=True) == "loop"


def test_tma_selection_rules(monkeypatch):
    from moeco.fp8 import Fp8Recipe, fp8_grouped_mm

    a = torch.zeros(64, 256, dtype=torch.float8_e4m3fn)
    assert triton_kernels.use_tma(a, tma=True) and not triton_kernels.use_tma(a, tma=False)  # forced
    assert not triton_kernels.use_tma(a)  # CPU tensors (and the interpreter) take the pointer kernels
    # the recipe's tma reaches every grouped kernel: False forces the pointer kernels, True lets them decide
    seen = []
    real = triton_kernels.use_tma
    monkeypatch.setattr(triton_kernels, "use_tma", lambda *t, tma=None: seen.append(tma) or real(*t, tma=tma))
    offs = torch.tensor([3, 3, 8], dtype=torch.int32, device=DEVICE)
    for tma, want in ((False, {False}), (True, {None})):
        seen.clear()
        x = torch.randn(8, 128, device=DEVICE, requires_grad=True)
        w = torch.randn(3, 16, 128, device=DEVICE, requires_grad=True)
        fp8_grouped_mm(x, w, offs, recipe=Fp8Recipe(grouped_kernel="triton", tma=tma)).sum().backward()
        assert len(seen) == 3 and set(seen) == want  # Fprop, Dgrad, Wgrad
    # TMA needs 16-byte rows: K % 16 for the FP8 operands, N * itemsize % 16 for the output
    b = torch.zeros(48, 256, dtype=torch.float8_e4m3fn)
    assert triton_kernels.tma_gemm_ok(a, b, torch.bfloat16)
    assert not triton_kernels.tma_gemm_ok(a[:, :200], b[:, :200], torch.bfloat16)  # K = 200
    assert not triton_kernels.tma_gemm_ok(a, torch.zeros(36, 256, dtype=torch.float8_e4m3fn), torch.bfloat16)
    assert triton_kernels.tma_gemm_ok(a, torch.zeros(36, 256, dtype=torch.float8_e4m3fn), torch.float32)


@pytest.mark.parametrize("counts,T", [([5, 0, 9], 20), ([5, 0, 9], 14), ([0], 3)])
def test_zero_rows_past_the_last_expert(counts, T):
    c = torch.randn(T, 70, device=DEVICE) + 5
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).to(DEVICE)
    before = c.clone()
    triton_kernels.zero_rows_past(c, offs)
    end = sum(counts)
    assert torch.equal(c[:end], before[:end]) and (c[end:] == 0).all()


@pytest.mark.parametrize("counts,T", [([5, 0, 9, 2], 16), ([3, 4], 10), ([0, 0, 7], 7), ([17, 1], 40), ([], 5)])
def test_group_scales_kernel_matches_reference(counts, T):
    from moeco.fp8.fbgemm import group_scales_reference

    gen = torch.Generator().manual_seed(len(counts) + T)
    a_scale = torch.rand(3, T, generator=gen).to(DEVICE).t()  # the (KB, T) buffer, seen as (T, KB)
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(DEVICE)
    got, sizes = triton_kernels.group_scales(a_scale, offs)
    assert torch.equal(got, group_scales_reference(a_scale, offs))
    assert sizes.tolist() == counts
