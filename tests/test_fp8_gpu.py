"""FP8 fast paths on CUDA against the CPU reference (run with -m gpu on the GPU machine)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from moeco.fp8 import Fp8Linear, fp8_grouped_mm  # noqa: E402
from moeco.fp8.gemm import fp8_gemm, fp8_gemm_reference  # noqa: E402
from moeco.fp8.quantize import (  # noqa: E402
    quantize_act_1x128,
    quantize_act_1x128_reference,
    quantize_weight_128x128,
)


# Hopper's FP8 MMA accumulates each 128-deep partial product in a ~14-bit accumulator before our
# FP32 promotion, so CUDA results differ from the FP32 reference by ~2e-4 of the largest value
# (the CPU emulator predicts 1.2e-4 to 2.3e-4 for normal inputs; see test_fp8_gemm.py).
TOL = 5e-4


def _rel(out, ref):
    return ((out.double().cpu() - ref.double().cpu()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("M,N,K", [(256, 512, 1024), (200, 384, 7168 // 4), (4096, 2048, 7168), (37, 576, 1000)])
@pytest.mark.parametrize("b_tiles", [False, True])
@pytest.mark.parametrize("backend", ["scaled_mm", "triton", "wgmma"])
def test_cuda_gemm_backends_match_reference(M, N, K, b_tiles, backend):
    if backend == "wgmma" and (torch.cuda.get_device_capability() != (9, 0) or K % 16):
        pytest.skip("the wgmma kernel runs on Hopper, K % 16 == 0")
    gen = torch.Generator().manual_seed(M + N + K)
    a, b = torch.randn(M, K, generator=gen).cuda(), torch.randn(N, K, generator=gen).cuda()
    aq, sa = quantize_act_1x128(a)
    bq, sb = quantize_act_1x128(b) if b_tiles else quantize_weight_128x128(b)
    ref = fp8_gemm_reference(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), torch.float32)
    out = fp8_gemm(aq, sa, bq, sb, torch.float32, backend=backend)
    assert _rel(out, ref) < TOL


@pytest.mark.parametrize("N", [576, 200])
def test_auto_falls_back_for_n_not_multiple_of_128(N):
    gen = torch.Generator().manual_seed(N)
    a, b = torch.randn(512, 1024, generator=gen).cuda(), torch.randn(N, 1024, generator=gen).cuda()
    aq, sa = quantize_act_1x128(a)
    bq, sb = quantize_weight_128x128(b)
    out = fp8_gemm(aq, sa, bq, sb, torch.float32)
    assert _rel(out, fp8_gemm_reference(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu())) < TOL


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="the wgmma kernel needs sm_90")


@hopper
@pytest.mark.parametrize("M,N,K", [(1, 8, 16), (77, 64, 256), (129, 520, 2064), (300, 136, 1024), (1000, 7168, 576),
                                   (4096, 576, 7168), (5000, 2048, 7168)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bn", [64, 128])
@pytest.mark.parametrize("b_rows", [False, True])
def test_wgmma_gemm_matches_reference_and_cublas(M, N, K, out_dtype, bn, b_rows):
    """moeco's Hopper kernel on fresh random operands: ragged M and N (TMA's zero fill and clipped
    stores), K not a multiple of 128, both tile widths, B scaled per 128x128 block or per row
    (Wgrad), against the FP32-promotion reference and, where cuBLAS takes the shape, against cuBLAS
    (the same promotion, so the same rounding up to the order of the scale products)."""
    from moeco.fp8 import cuda_gemm

    gen = torch.Generator().manual_seed(M * 7 + N + K)
    a, b = torch.randn(M, K, generator=gen).cuda(), torch.randn(N, K, generator=gen).cuda()
    aq, sa = quantize_act_1x128(a)
    bq, sb = quantize_act_1x128(b) if b_rows else quantize_weight_128x128(b)
    assert cuda_gemm.supported(aq, sa, bq, sb, out_dtype)
    out = cuda_gemm.fp8_gemm_nt(aq, sa, bq, sb, out_dtype, bn=bn)
    assert out.shape == (M, N) and out.dtype == out_dtype
    ref = fp8_gemm_reference(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), torch.float32)
    assert _rel(out, ref) < (TOL if out_dtype == torch.float32 else 8e-3)
    if N % 128 == 0 and K % 128 == 0:
        cublas = fp8_gemm(aq, sa, bq, sb, out_dtype, backend="scaled_mm")
        assert _rel(out, cublas.float()) < (1e-5 if out_dtype == torch.float32 else 8e-3)
    if b_rows and bn == 128:  # the two-CTA variant: the same bits
        assert torch.equal(cuda_gemm.fp8_gemm_nt(aq, sa, bq, sb, out_dtype, cluster=2), out)
    # A's scales in either layout (the kernel copies them with any strides): the same bits
    assert torch.equal(cuda_gemm.fp8_gemm_nt(aq, sa.contiguous(), bq, sb, out_dtype, bn=bn), out)
    assert torch.equal(cuda_gemm.fp8_gemm_nt(aq, sa.t().contiguous().t(), bq, sb, out_dtype, bn=bn), out)
    if not b_rows:  # 256-row and 192-wide tiles: the same sums in the same order, so the same bits
        assert torch.equal(cuda_gemm.fp8_gemm_nt(aq, sa, bq, sb, out_dtype, bn=bn, bm=256), out)
        if bn == 128:
            assert torch.equal(cuda_gemm.fp8_gemm_nt(aq, sa, bq, sb, out_dtype, bn=192), out)


@hopper
@pytest.mark.parametrize("b_rows,bn,out_dtype", [(False, 128, torch.bfloat16), (False, 192, torch.bfloat16),
                                                 (False, 64, torch.float32), (True, 128, torch.float32),
                                                 (True, 64, torch.float32)])
def test_wgmma_gemm_repeats_bit_for_bit(b_rows, bn, out_dtype):
    """A race in the kernel shows as a rare different result: 500 calls on the same operands give
    the same bits. The per-row form lacked a proxy fence before freeing a stage whose scales it had
    read (about 1 call in 400-1500 differed with bn=64, fp32 out), which this would catch at times."""
    from moeco.fp8 import cuda_gemm

    gen = torch.Generator().manual_seed(11)
    N = 576 if bn == 192 else 2048
    a, b = torch.randn(4096, 7168, generator=gen).cuda(), torch.randn(N, 7168, generator=gen).cuda()
    aq, sa = quantize_act_1x128(a)
    bq, sb = quantize_act_1x128(b) if b_rows else quantize_weight_128x128(b)
    first = cuda_gemm.fp8_gemm_nt(aq, sa, bq, sb, out_dtype, bn=bn)
    differ = sum(not torch.equal(cuda_gemm.fp8_gemm_nt(aq, sa, bq, sb, out_dtype, bn=bn), first) for _ in range(500))
    assert differ == 0, f"{differ} of 500 calls differ"


@hopper
def test_wgmma_gemm_auto_choice_and_cuda_graph():
    """`auto` takes the wgmma kernel where cuBLAS would pad (N = 576) and cuBLAS elsewhere;
    the recipe's gemm_kernel overrides it; the kernel replays inside a CUDA graph on new data."""
    from moeco.fp8 import cuda_gemm

    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(512, 7168, generator=gen).cuda(), torch.randn(576, 7168, generator=gen).cuda()
    aq, sa = quantize_act_1x128(a)
    bq, sb = quantize_weight_128x128(b)
    mine = cuda_gemm.fp8_gemm_nt(aq, sa, bq, sb)
    assert torch.equal(fp8_gemm(aq, sa, bq, sb), mine)
    assert torch.equal(fp8_gemm(aq, sa, bq, sb, gemm_kernel="cublas"), fp8_gemm(aq, sa, bq, sb, backend="scaled_mm"))
    sq, ss = quantize_weight_128x128(torch.randn(1024, 7168, generator=gen).cuda())
    assert torch.equal(fp8_gemm(aq, sa, sq, ss, gemm_kernel="wgmma"), cuda_gemm.fp8_gemm_nt(aq, sa, sq, ss))
    with pytest.raises(ValueError, match="gemm_kernel='fast'"):
        fp8_gemm(aq, sa, bq, sb, gemm_kernel="fast")

    x = torch.zeros_like(a)
    graph_out = {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fp8_gemm(*quantize_act_1x128(x), bq, sb)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graph_out["y"] = fp8_gemm(*quantize_act_1x128(x), bq, sb)
    x.copy_(a)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(graph_out["y"], mine)


@hopper
@pytest.mark.parametrize("counts,tail,M,N", [([5, 0, 300, 3, 129], 7, 256, 200), ([0, 0], 0, 128, 136),
                                             ([700, 1, 0, 260, 511, 64, 0, 900], 3, 384, 768)])
def test_wgmma_grouped_wgrad_matches_reference_and_triton(counts, tail, M, N):
    """The experts' Wgrad as moeco's Hopper kernel (`cuda_gemm.fp8_grouped_wgrad_nt`, through
    `fp8_grouped_wgrad(gemm="wgmma")`) against the per-expert CPU reference and Triton's grouped kernel:
    empty experts (zeros), experts over several 128-token blocks, rows past the last expert, a partial
    last column tile; the same bits on repeated calls; and Triton's where the kernel cannot take the
    shape (rows not a multiple of 128)."""
    from moeco.fp8 import cuda_gemm, triton_kernels
    from moeco.fp8.grouped_wgrad import fp8_grouped_wgrad
    from moeco.fp8.quantize import quantize_act_1x128_t

    gen = torch.Generator().manual_seed(sum(counts) + M + N)
    E, T = len(counts), sum(counts) + tail
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    gy = torch.randn(T, M, generator=gen).to(torch.bfloat16)
    x = torch.randn(T, N, generator=gen) * torch.exp2(torch.randint(-4, 4, (T, 1), generator=gen).float())
    xq, xs = quantize_act_1x128(x)
    args = (gy.cuda(), xq.cuda(), xs.cuda(), offs.cuda(), E)
    got = fp8_grouped_wgrad(*args, gemm="wgmma")
    tri = fp8_grouped_wgrad(*args, gemm="triton")

    def one(a, b):
        gtq, gts = quantize_act_1x128_t(gy[a:b])
        xtq, xts = quantize_act_1x128_t(xq[a:b], xs[a:b])
        return fp8_gemm_reference(gtq, gts, xtq, xts)

    ends = offs.tolist()
    ref = torch.stack([one(a, b) if b > a else torch.zeros(M, N) for a, b in zip([0] + ends[:-1], ends)])
    assert got.shape == (E, M, N) and got.dtype == torch.float32
    scale = max(ref.abs().max().item(), 1e-30)
    assert (got.cpu() - ref).abs().max().item() / scale < 5e-4
    assert (got - tri).abs().max().item() / scale < 2e-6
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.equal(got[e].cpu(), torch.zeros(M, N))
    for _ in range(20):
        assert torch.equal(fp8_grouped_wgrad(*args, gemm="wgmma"), got)
    # the kernel itself took these shapes (not the Triton fallback)
    dest, pstart, Tp = triton_kernels.grouped_padded_rows(offs.cuda(), T)
    src = torch.full((Tp,), -1, dtype=torch.int32, device="cuda")
    src.scatter_(0, dest, torch.arange(T, dtype=torch.int32, device="cuda"))
    gq, gs = quantize_act_1x128_t(args[0], rows=src)
    xtq, xts = quantize_act_1x128_t(args[1], args[2], rows=src)
    assert cuda_gemm.grouped_supported(gq, gs, xtq, xts)
    assert torch.equal(cuda_gemm.fp8_grouped_wgrad_nt(gq, gs, xtq, xts, pstart, E), got)
    # rows not a multiple of 128: Triton's kernel, same numbers as asking for it
    args2 = (gy[:, :200].contiguous().cuda(), *args[1:])
    assert torch.equal(fp8_grouped_wgrad(*args2, gemm="wgmma"),
                       fp8_grouped_wgrad(*args2, gemm="triton"))


@hopper
def test_wgmma_gemm_cluster_of_two_matches():
    """The two-CTA cluster variant (B half-tiles multicast) gives the same numbers, odd m-tile counts included."""
    from moeco.fp8 import cuda_gemm

    gen = torch.Generator().manual_seed(11)
    for M, N, K in [(300, 136, 1024), (4096, 2048, 7168), (129, 520, 2064), (1000, 7168, 576)]:
        a, b = torch.randn(M, K, generator=gen).cuda(), torch.randn(N, K, generator=gen).cuda()
        aq, sa = quantize_act_1x128(a)
        bq, sb = quantize_weight_128x128(b)
        for out_dtype in (torch.bfloat16, torch.float32):
            assert torch.equal(cuda_gemm.fp8_gemm_nt(aq, sa, bq, sb, out_dtype, cluster=2),
                               cuda_gemm.fp8_gemm_nt(aq, sa, bq, sb, out_dtype))


def test_cuda_quantization_bit_exact_large():
    x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16) * 3
    q, s = quantize_act_1x128(x)
    q_ref, s_ref = quantize_act_1x128_reference(x)
    assert torch.equal(s.contiguous(), s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_cuda_token_wise_quantization_bit_exact_large():
    """The Wgrad operand: 128x1 tiles from the saved FP8 1x128 tiles (ragged T and C)."""
    from moeco.fp8 import triton_kernels

    x = torch.randn(4096 + 200, 7168 - 64, device="cuda", dtype=torch.bfloat16) * 3
    xq, xs = triton_kernels.quantize_act_1x128(x)
    q, s = triton_kernels.quantize_act_1x128_t(xq, xs)
    xd = xq.float() * xs.repeat_interleave(128, -1)[:, : x.shape[1]]
    q_ref, s_ref = quantize_act_1x128_reference(xd.t().contiguous())
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("kind", ["bf16", "fp16", "fp32", "fp8"])
@pytest.mark.parametrize("T,C,gather", [(4096 + 200, 7168 - 64, False), (300, 200, False), (300, 136, True),
                                        (1000, 1024, True)])
@pytest.mark.parametrize("pow2", [False, True])
def test_nvrtc_token_wise_quantization_equals_cpu_bit_for_bit(kind, T, C, gather, pow2):
    """The NVRTC 128x1 kernel (Wgrad's operands) against the CPU reference: every input kind it reads,
    FP8 with its 1x128 scales (the re-tiling), ragged T (the byte-store tail) and C (a partial
    64-channel tile), a row map with padding rows, power-of-two scales."""
    from moeco.fp8 import cuda_kernels
    from moeco.fp8.quantize import quantize_act_1x128_t

    gen = torch.Generator().manual_seed(T + C)
    x = torch.randn(T, C, generator=gen) * torch.exp2(torch.randint(-10, 10, (1, C), generator=gen).float())
    x[:, 3] = 0.0
    x[5, :] = -0.0
    xs = None
    if kind == "fp8":
        x, xs = quantize_act_1x128(x)
        xs = xs.t().contiguous().t()  # the forward's outer-dim-major scales
    else:
        x = x.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[kind])
    rows = None
    if gather:
        rows = torch.full((T + 300,), -1, dtype=torch.int32)
        perm = torch.randperm(T, generator=gen).to(torch.int32)
        rows[10:10 + T // 2] = perm[: T // 2]
        rows[300 + T // 2: 300 + T] = perm[T // 2:]
    assert cuda_kernels.token_wise_supported(x.cuda(), None if xs is None else xs.cuda())
    out = cuda_kernels.token_wise(x.cuda(), None if xs is None else xs.cuda(), pow2_scale=pow2,
                                  rows=None if rows is None else rows.cuda())
    assert out is not None, cuda_kernels.status()
    q, s = out
    q_c, s_c = quantize_act_1x128_t(x, xs, pow2_scale=pow2, rows=rows)
    assert s.stride() == (1, C) and q.shape == q_c.shape
    assert torch.equal(s.cpu(), s_c)
    assert torch.equal(q.cpu().view(torch.uint8), q_c.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,C", [(4096 + 200, 7168 - 64), (300, 516), (129, 128), (16384, 2048)])
@pytest.mark.parametrize("pow2", [False, True])
def test_nvrtc_dual_quantization_equals_cpu_bit_for_bit(dtype, T, C, pow2):
    """dy's two tilings from one kernel (`cuda_kernels.dual`) against the CPU reference of each: ragged
    T (the byte-store tail, a partial 16-token warp) and C (a 4-channel tail of a 128-channel tile),
    zero rows and columns, -0, values over many binades (within fp16's range), power-of-two scales."""
    from moeco.fp8 import cuda_kernels
    from moeco.fp8.quantize import quantize_act_1x128_dual, quantize_act_1x128_t

    gen = torch.Generator().manual_seed(T * 7 + C)
    x = torch.randn(T, C, generator=gen) * torch.exp2(torch.randint(-10, 10, (1, C), generator=gen).float())
    x = x * torch.exp2(torch.randint(-6, 3, (T, 1), generator=gen).float())  # |x| < 2^15: finite in fp16
    x[:, 3] = 0.0
    x[5, :] = -0.0
    x[7, 100:] = 0.0
    x = x.to(dtype)
    assert cuda_kernels.dual_supported(x.cuda())
    (q, s), (qt, st) = quantize_act_1x128_dual(x.cuda(), pow2_scale=pow2)
    q_c, s_c = quantize_act_1x128_reference(x, pow2_scale=pow2)
    qt_c, st_c = quantize_act_1x128_t(x, pow2_scale=pow2)
    assert s.stride() == (1, T) and st.stride() == (1, C) and q.shape == (T, C) and qt.shape == (C, T)
    assert torch.equal(s.cpu(), s_c) and torch.equal(st.cpu(), st_c)
    assert torch.equal(q.cpu().view(torch.uint8), q_c.view(torch.uint8))
    assert torch.equal(qt.cpu().view(torch.uint8), qt_c.view(torch.uint8))


def test_fp8_linear_backward_same_with_and_without_the_dual_kernel():
    """Fp8Linear's gradients with dy's tilings from the one-read kernel equal those from the two
    separate kernels (the recipe's quant_kernel="triton" turns the NVRTC kernels off)."""
    from moeco.fp8 import Fp8Linear, Fp8Recipe

    torch.manual_seed(3)
    lin = Fp8Linear(1024, 640).cuda()
    x = torch.randn(700, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(700, 640, device="cuda", dtype=torch.bfloat16)
    grads = []
    for mode in ("auto", "triton"):
        lin.recipe = Fp8Recipe(quant_kernel=mode)
        x.grad = lin.weight.grad = None
        lin(x).backward(gy)
        grads.append((x.grad.clone(), lin.weight.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("pow2", [False, True])
def test_cuda_quantization_equals_cpu_bit_for_bit(pow2):
    """The GPU kernels and the CPU reference are the same function, scales included.

    Until the sixth session the scale was `amax / 448.0`: IEEE on CPU, a reciprocal multiplication in
    PyTorch's CUDA kernel and `/` (approximate) in Triton, one ulp apart in about half the tiles."""
    from moeco.fp8 import triton_kernels
    from moeco.fp8.quantize import quantize_act_1x128_t, quantize_weight_128x128_reference

    gen = torch.Generator().manual_seed(7)
    # values spread over many binades, so that scales and quotients hit all mantissa patterns
    x = torch.randn(1000, 2000, generator=gen) * torch.exp2(torch.randint(-8, 8, (1000, 1), generator=gen).float())
    q, s = quantize_act_1x128(x.cuda(), pow2_scale=pow2)
    q_c, s_c = quantize_act_1x128_reference(x, pow2_scale=pow2)
    assert torch.equal(s.cpu(), s_c)
    assert torch.equal(q.cpu().view(torch.uint8), q_c.view(torch.uint8))
    qt, st = triton_kernels.quantize_act_1x128_t(x.cuda(), pow2_scale=pow2)
    qt_c, st_c = quantize_act_1x128_t(x, pow2_scale=pow2)
    assert torch.equal(st.cpu(), st_c)
    assert torch.equal(qt.cpu().view(torch.uint8), qt_c.view(torch.uint8))
    w = x[:768, :1536] * 0.01
    wq, ws = quantize_weight_128x128(w.cuda(), pow2_scale=pow2)
    wq_c, ws_c = quantize_weight_128x128_reference(w, pow2_scale=pow2)
    assert torch.equal(ws.cpu(), ws_c)
    assert torch.equal(wq.cpu().view(torch.uint8), wq_c.view(torch.uint8))


def test_cuda_fp8_linear_and_grouped_match_cpu():
    torch.manual_seed(0)
    lin = Fp8Linear(1024, 768)
    x = torch.randn(300, 1024, requires_grad=True)
    y = lin(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    lin_c = Fp8Linear(1024, 768).cuda()
    lin_c.load_state_dict(lin.state_dict())
    xc = x.detach().cuda().requires_grad_()
    yc = lin_c(xc)
    yc.backward(gy.cuda())
    errs = [_rel(yc, y), _rel(xc.grad, x.grad), _rel(lin_c.weight.grad, lin.weight.grad)]
    # Both sides quantize on their own device. Measured on an H200: 1.36e-3, 1.48e-3, 1.64e-3 while
    # the scale was `amax / 448.0` (CUDA: a reciprocal multiplication), where one element rounded
    # differently (one E4M3 ulp of a large weight) moves the max error by ~1e-3; 1.9e-4, 2.0e-4,
    # 3.9e-4 (the GEMM-only deviation) since both devices divide correctly rounded (sixth session).
    assert max(errs) < 8e-4, errs
    offs = torch.tensor([100, 100, 300], dtype=torch.int32)
    w = torch.randn(3, 256, 1024, requires_grad=True)
    x.grad = None  # the Linear check above left its Dgrad here
    yg = fp8_grouped_mm(x, w, offs)
    yg.backward(torch.ones_like(yg))
    wc = w.detach().cuda().requires_grad_()
    xc2 = x.detach().cuda().requires_grad_()
    ygc = fp8_grouped_mm(xc2, wc, offs.cuda())
    ygc.backward(torch.ones_like(ygc))
    errs = [_rel(ygc, yg), _rel(wc.grad, w.grad), _rel(xc2.grad, x.grad)]
    assert max(errs) < TOL, errs


def _ragged_offs(E, T, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.ones(E), T, replacement=True, generator=gen).bincount(minlength=E)
    counts[1] = 0  # one expert without tokens
    counts[2] += T - counts.sum()
    return counts.tolist(), counts.cumsum(0).to(torch.int32)


@pytest.mark.parametrize("N,K", [(768, 1536), (1536, 768)])
def test_cuda_grouped_gemm_matches_reference(N, K):
    from moeco.fp8 import triton_kernels

    E, T = 8, 2000
    counts, offs = _ragged_offs(E, T, N)
    gen = torch.Generator().manual_seed(K)
    x, w = torch.randn(T, K, generator=gen).cuda(), torch.randn(E, N, K, generator=gen).cuda()
    xq, xs = quantize_act_1x128(x)
    wq, ws = quantize_weight_128x128(w)
    out = triton_kernels.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs.cuda(), torch.float32)
    xq, xs, wq, ws = xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu()
    ref = torch.zeros(T, N)
    r0 = 0
    for e, c in enumerate(counts):
        if c:
            ref[r0:r0 + c] = fp8_gemm_reference(xq[r0:r0 + c], xs[r0:r0 + c], wq[e], ws[e])
        r0 += c
    assert _rel(out, ref) < TOL


def test_cuda_grouped_fn_triton_matches_loop():
    from moeco.fp8 import Fp8Recipe

    E, T, N, K = 8, 2000, 768, 1536
    counts, offs = _ragged_offs(E, T, 5)
    offs = offs.cuda()
    gen = torch.Generator().manual_seed(6)
    x0 = torch.randn(T, K, generator=gen).cuda().bfloat16()
    w0 = (torch.randn(E, N, K, generator=gen) * 0.02).cuda()
    gy = torch.randn(T, N, generator=gen).cuda().bfloat16()
    res = {}
    for mode in ("loop", "triton"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fp8_grouped_mm(x, w, offs, recipe=Fp8Recipe(grouped_kernel=mode))
        y.backward(gy)
        res[mode] = (y.float(), x.grad.float(), w.grad.float())
    errs = [_rel(a, b) for a, b in zip(res["triton"], res["loop"])]
    # bf16 outputs (y, dx) round independently on the two paths: up to 2^-8 of one element.
    assert max(errs) < 8e-3, errs
    assert errs[2] < 1e-3, errs  # two GPU GEMMs (scaled_mm per expert vs grouped Triton), ~2e-4 each


def test_cuda_weight_quant_bit_exact_with_transpose():
    from moeco.fp8 import triton_kernels
    from moeco.fp8.quantize import quantize_weight_128x128_reference

    w = torch.randn(8, 768, 1536, device="cuda") * 0.02
    q, s, qt = triton_kernels.quantize_weight_128x128(w, transposed=True)
    q_ref, s_ref = quantize_weight_128x128_reference(w)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(qt.view(torch.uint8), q_ref.transpose(1, 2).contiguous().view(torch.uint8))


def test_markstein_division_equals_div_rn():
    """The quantization kernels' x / s (reciprocal + Markstein's correction) against div_rn, in the
    domain the kernels use (s >= 1e-4 / 448, |x| <= 448 s): every float32 mantissa in [1, 2) against
    64 scales, then 2^24 random bit patterns of any exponent (zeros and subnormals too), each with its
    own scale. Bit-equal quotients where they are at least 2^-12 (E4M3's smallest step is 2^-9), and
    equal E4M3 values everywhere."""
    import triton
    import triton.language as tl

    from moeco.fp8.triton_kernels import _div_by_scale

    @triton.jit
    def _both(x_ptr, s_ptr, a_ptr, b_ptr, n, PER_S: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(x_ptr + offs, mask=ok, other=1.0)
        if PER_S:
            s = tl.load(s_ptr + tl.program_id(1) + offs * 0)
        else:
            s = tl.load(s_ptr + offs, mask=ok, other=1.0)
        out = tl.program_id(1).to(tl.int64) * n + offs
        tl.store(a_ptr + out, _div_by_scale(x, s, True), mask=ok)
        tl.store(b_ptr + out, _div_by_scale(x, s, False), mask=ok)

    def check(x, s, per_s):
        rows = s.numel() if per_s else 1
        a = torch.empty(rows, x.numel(), device="cuda")
        b = torch.empty_like(a)
        _both[(triton.cdiv(x.numel(), 1024), rows)](x, s, a, b, x.numel(), PER_S=per_s, BLOCK=1024)
        wrong = ((a.view(torch.int32) != b.view(torch.int32)) & (b.abs() >= 2.0**-12)) | (
            a.to(torch.float8_e4m3fn).view(torch.uint8) != b.to(torch.float8_e4m3fn).view(torch.uint8))
        idx = wrong.nonzero()[:5].tolist()
        xs = x.expand(rows, -1)
        ss = s[:, None].expand(-1, x.numel()) if per_s else s[None]
        examples = [(xs[i, j].item(), ss[i, j].item(), a[i, j].item(), b[i, j].item()) for i, j in idx]
        assert not examples, f"{int(wrong.sum())} mismatches (x, s, fast, div_rn): {examples}"

    gen = torch.Generator(device="cuda").manual_seed(3)
    mant = torch.arange(1 << 23, dtype=torch.int32, device="cuda") | 0x3F800000  # [1, 2)
    x = torch.cat([mant.view(torch.float32), -mant.view(torch.float32)])
    for amax in (torch.rand(16, generator=gen, device="cuda") * 1e3 + 1e-4).split(4):
        check(x, amax / torch.full_like(amax, 448.0), True)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 24,), generator=gen, device="cuda", dtype=torch.int32)
    xr = bits.view(torch.float32)
    amax = (torch.rand(xr.numel(), generator=gen, device="cuda") * 1e3 + 1e-4)
    amax = amax * torch.exp2(torch.randint(0, 30, amax.shape, generator=gen, device="cuda").float())
    sr = amax / torch.full_like(amax, 448.0)
    xr = torch.where(torch.isfinite(xr) & (xr.abs() <= amax), xr, torch.zeros_like(xr))
    assert (xr != 0).float().mean() > 0.3
    xr[:4] = torch.tensor([0.0, -0.0, 1e-45, -1e-45], device="cuda")
    check(xr, sr, False)
