"""FP8 GEMM backends on CPU: the reference against float64, and the accumulation-precision study."""

import pytest
import torch

from moeco.fp8.gemm import emulate_hopper_accumulation, fp8_gemm, fp8_gemm_reference
from moeco.fp8.quantize import (
    dequantize_act_1x128,
    dequantize_weight_128x128,
    quantize_act_1x128,
    quantize_weight_128x128,
)


def _operands(M, N, K, gen, dist="normal", b_tiles=False):
    draw = torch.randn if dist == "normal" else torch.rand
    a = draw((M, K), generator=gen)
    b = draw((N, K), generator=gen)
    aq, sa = quantize_act_1x128(a)
    bq, sb = quantize_act_1x128(b) if b_tiles else quantize_weight_128x128(b)
    a64 = dequantize_act_1x128(aq, sa).double()
    b64 = (dequantize_act_1x128(bq, sb) if b_tiles else dequantize_weight_128x128(bq, sb)).double()
    return aq, sa, bq, sb, a64 @ b64.t()


@pytest.mark.parametrize("M,N,K", [(64, 128, 256), (33, 200, 300), (1, 7, 129), (130, 64, 1024)])
@pytest.mark.parametrize("b_tiles", [False, True])
def test_reference_equals_float64_on_dequantized_operands(M, N, K, b_tiles):
    gen = torch.Generator().manual_seed(M * N + K)
    aq, sa, bq, sb, ref = _operands(M, N, K, gen, b_tiles=b_tiles)
    out = fp8_gemm_reference(aq, sa, bq, sb, torch.float32)
    assert out.shape == (M, N) and out.dtype == torch.float32
    # float32 rounding of K/128 promoted partial sums: a few float32 ulps of the largest term
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < 2e-6, err
    assert fp8_gemm(aq, sa, bq, sb, torch.float32).equal(out)  # "auto" on CPU is the reference
    bf = fp8_gemm(aq, sa, bq, sb, torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, out.bfloat16())


def test_bad_arguments_say_what_to_do():
    aq, sa = quantize_act_1x128(torch.randn(4, 256))
    bq, sb = quantize_weight_128x128(torch.randn(256, 256))
    with pytest.raises(ValueError, match="unknown FP8 GEMM backend"):
        fp8_gemm(aq, sa, bq, sb, backend="cutlass")
    with pytest.raises(ValueError, match="b_scale has shape"):
        fp8_gemm(aq, sa, bq, torch.ones(3, 2))
    with pytest.raises(ValueError, match="a_scale has shape"):
        fp8_gemm(aq, sa[:, :1], bq, sb)


def _max_rel(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_limited_accumulation_error_grows_with_k_and_promotion_removes_it():
    """DeepSeek-V3 3.3: a ~14-bit Tensor Core accumulator loses precision as K grows.

    Same-sign products (uniform [0, 1) inputs) are the worst case: the running sum grows and each
    new product is truncated against its exponent, so the error grows linearly with K. Measured
    (3 seeds, 32x32 outputs): 1.1% at K=512, 2.1% at 1024, 4.1% at 2048, 8.0-8.2% at 4096 without
    promotion; 0.06-0.07% at every K with promotion every 128. Random-sign (normal) inputs: 0.13-0.19%
    at K=512 and 0.40-0.50% at 4096 without promotion, 0.012-0.023% with it. The paper's "nearly 2%"
    at K=4096 lies between the two input kinds.
    """
    gen = torch.Generator().manual_seed(0)
    errs = {}
    for dist in ("uniform", "normal"):
        for K in (512, 4096):
            aq, sa, bq, sb, ref = _operands(32, 32, K, gen, dist)
            errs[dist, K, None] = _max_rel(emulate_hopper_accumulation(aq, sa, bq, sb, promotion=None), ref)
            errs[dist, K, 128] = _max_rel(emulate_hopper_accumulation(aq, sa, bq, sb, promotion=128), ref)
    assert 0.006 < errs["uniform", 512, None] < 0.02
    assert 0.05 < errs["uniform", 4096, None] < 0.12
    assert errs["uniform", 4096, None] > 5 * errs["uniform", 512, None]  # linear in K
    assert 0.002 < errs["normal", 4096, None] < 0.01
    for dist in ("uniform", "normal"):
        assert errs[dist, 4096, 128] < 1e-3
        assert errs[dist, 4096, 128] < errs[dist, 512, 128] * 2  # flat in K
        assert errs[dist, 4096, 128] < errs[dist, 4096, None] / 20


def test_emulator_with_full_precision_is_the_reference():
    gen = torch.Generator().manual_seed(3)
    aq, sa, bq, sb, ref = _operands(16, 16, 512, gen)
    out = emulate_hopper_accumulation(aq, sa, bq, sb, promotion=128, frac_bits=52)
    assert _max_rel(out, ref) < 1e-6


def test_wgmma_backend_errors_on_cpu():
    """backend='wgmma' where the kernel cannot run is a one-line error naming the fix; a bad
    gemm_kernel is a one-line error (ConfigError in the recipe); CPU operands never reach the kernel."""
    from moeco.errors import ConfigError
    from moeco.fp8 import Fp8Recipe, cuda_gemm
    from moeco.fp8.quantize import quantize_act_1x128, quantize_weight_128x128

    aq, sa = quantize_act_1x128(torch.randn(64, 256))
    bq, sb = quantize_weight_128x128(torch.randn(128, 256))
    assert not cuda_gemm.supported(aq, sa, bq, sb)
    with pytest.raises(ValueError, match="the wgmma FP8 GEMM cannot take .* use backend='auto'"):
        fp8_gemm(aq, sa, bq, sb, backend="wgmma")
    with pytest.raises(ConfigError, match="Fp8Recipe.gemm_kernel='fastest'; valid: auto, wgmma, cublas"):
        Fp8Recipe(gemm_kernel="fastest")
    with pytest.raises(ValueError, match="gemm_kernel='fastest'; valid: auto, wgmma, cublas"):
        fp8_gemm(aq, sa, bq, sb, gemm_kernel="fastest")
    for kernel in ("wgmma", "cublas"):
        out = fp8_gemm(aq, sa, bq, sb, torch.float32, gemm_kernel=kernel)  # CPU: the reference, whatever the choice
        assert torch.equal(out, fp8_gemm(aq, sa, bq, sb, torch.float32, backend="reference"))


def test_wgmma_source_has_one_operand_per_accumulator():
    """The generated WGMMA call names bn/2 accumulators, then the two descriptors and the flag."""
    from moeco.fp8 import cuda_gemm

    for bn in (64, 128):
        src = cuda_gemm.source(bn)
        assert f"m64n{bn}k32.f32.e4m3.e4m3 {{%0, " in src and f"%{bn // 2 - 1}}}, %{bn // 2}, %{bn // 2 + 1}, p" in src
        assert src.count('"+f"(d[') == bn // 2


def test_wgmma_tile_width_choice():
    """192-wide tiles where they remove the padding of a 128-wide last tile (MLA's N = 576), 128 elsewhere."""
    from moeco.fp8 import cuda_gemm

    assert cuda_gemm.tile_width(576) == 192 and cuda_gemm.tile_width(192 * 7) == 192
    assert cuda_gemm.tile_width(7168) == 128 and cuda_gemm.tile_width(768) == 128 and cuda_gemm.tile_width(288) == 128
    assert cuda_gemm.tile_width(576, rowwise=True) == 128 and cuda_gemm.tile_width(576, bm=256) == 128
    assert cuda_gemm.tile_width(576, cluster=2) == 128
    for n in (576, 7168, 288):  # the chosen width is one the kernel takes
        cuda_gemm.check_variant(cuda_gemm.tile_width(n), False, cuda_gemm.STAGES, 1)


def test_wgmma_variant_errors_name_the_fix():
    """A stage count, tile width or cluster the kernel cannot take is a one-line error before any
    compile, so it cannot turn the kernel off for the rest of the process."""
    from moeco.fp8 import cuda_gemm

    cuda_gemm.check_variant(128, False, 4, 1)
    cuda_gemm.check_variant(128, True, 4, 2, rowwise=True)
    with pytest.raises(ValueError, match=r"stages=6 needs \d+ bytes of shared memory at bn=128, fp32 out, bm=128; use 2 to 4"):
        cuda_gemm.check_variant(128, True, 6, 1, rowwise=True)
    cuda_gemm.check_variant(128, False, 4, 1, bm=256)
    with pytest.raises(ValueError, match=r"stages=4 needs \d+ bytes of shared memory at bn=128, fp32 out, bm=256; use 2 to 3"):
        cuda_gemm.check_variant(128, True, 4, 1, bm=256)
    with pytest.raises(ValueError, match="bm=256 takes B scaled per 128x128 block and cluster=1"):
        cuda_gemm.check_variant(128, False, 3, 2, bm=256)
    with pytest.raises(ValueError, match="bm=192; valid: 128, 256"):
        cuda_gemm.check_variant(128, False, 3, 1, bm=192)
    cuda_gemm.check_variant(192, False, 4, 1)
    with pytest.raises(ValueError, match="bn=192 takes bm=128, cluster=1 and B scaled per 128x128 block"):
        cuda_gemm.check_variant(192, False, 3, 1, bm=256)
    with pytest.raises(ValueError, match="bn=256; valid: 64, 128, 192"):
        cuda_gemm.check_variant(256, False, 4, 1)
    with pytest.raises(ValueError, match="cluster=4; valid: 1, 2"):
        cuda_gemm.check_variant(128, False, 4, 4)
    cuda_gemm.check_variant(128, True, 4, 1, rowwise=True, grouped=True)  # the experts' Wgrad
    for bad in (dict(rowwise=False), dict(rowwise=True, bm=256), dict(rowwise=True, cluster=2)):
        kw = {"cluster": 1, **bad}
        with pytest.raises(ValueError, match="fp8_grouped_wgrad_nt: takes B scaled per row, bm=128"):
            cuda_gemm.check_variant(128, True, 3, kw.pop("cluster"), grouped=True, **kw)


def test_grouped_wgrad_variant_and_fallback_on_cpu(monkeypatch):
    """The experts' Wgrad variant compiles with -DGROUPED=1 under its own name and cache key (the dense
    variants keep theirs); CPU operands never reach it."""
    from moeco.fp8 import cuda_gemm, cuda_kernels

    calls = []
    monkeypatch.setattr(cuda_gemm, "_variants", cuda_kernels.CompiledVariants("FP8 GEMM", "cuBLAS"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_compile_kernel", lambda src, name, **kw: calls.append((name, kw["nvcc_options"]))
                        or (_ for _ in ()).throw(RuntimeError("no GPU here")), raising=False)
    with pytest.warns(UserWarning):
        assert cuda_gemm._kernel(128, True, 4, 1, True, 128, grouped=True) is None
    assert calls == [("moeco_fp8_gemm_128_128_1_4_1_1_grouped", ["-DBM=128", "-DBN=128", "-DSTAGES=4", "-DOUT_F32=1",
                                                                 "-DCLUSTER=1", "-DROWWISE=1", "-DGROUPED=1"])]
    q = torch.zeros(256, 1024, dtype=torch.float8_e4m3fn)
    assert not cuda_gemm.grouped_supported(q, torch.ones(256, 8), q, torch.ones(256, 8))


def test_compiled_variants_build_once_and_turn_off_on_failure():
    """The compile-at-first-use cache both NVRTC kernel families use: one build per key; the first
    failed build warns once, turns the family off (None from then on) and says why."""
    from moeco.fp8.cuda_kernels import CompiledVariants

    fam = CompiledVariants("test kernel", "the fallback")
    builds = []
    assert fam.get(("a",), lambda: builds.append("a") or "kernel a") == "kernel a"
    assert fam.get(("a",), lambda: builds.append("again") or "other") == "kernel a" and builds == ["a"]

    def fail():
        raise RuntimeError("no NVRTC here")

    with pytest.warns(UserWarning, match=r"the NVRTC test kernel did not compile \(RuntimeError: no NVRTC here\); "
                                         r"using the fallback"):
        assert fam.get(("b",), fail) is None
    assert fam.broken == "RuntimeError: no NVRTC here"
    assert fam.get(("c",), lambda: "never built") is None and ("c",) not in fam.cache
    assert fam.get(("a",), lambda: "other") == "kernel a"  # built before the failure: still served


def test_token_wise_register_bound_reaches_the_compiler(monkeypatch):
    """MIN_BLOCKS[kind] (or the caller's `minb`) becomes -DMINB (__launch_bounds__' second argument)
    and part of the kernel's name and cache key, so a changed bound builds a new variant; None (or
    minb=0) passes no bound."""
    from moeco.fp8 import cuda_kernels

    calls = []
    monkeypatch.setattr(cuda_kernels, "_variants", cuda_kernels.CompiledVariants("token-wise FP8 kernel", "Triton's"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_compile_kernel", lambda src, name, nvcc_options: calls.append(
        (name, nvcc_options, "__launch_bounds__(256, MINB)" in src)) or name, raising=False)
    assert cuda_kernels.MIN_BLOCKS[0] == 5  # the shipped bound for bf16
    assert cuda_kernels._kernel(0, False, False) == "moeco_token_wise_000_5"
    assert calls[-1] == ("moeco_token_wise_000_5", ["-DIN_KIND=0", "-DGATHER=0", "-DPOW2=0", "-DMINB=5"], True)
    assert cuda_kernels._kernel(0, False, False, minb=0) == "moeco_token_wise_000_0"  # 0: no bound
    assert calls[-1][1] == ["-DIN_KIND=0", "-DGATHER=0", "-DPOW2=0"] and len(calls) == 2
    assert cuda_kernels._kernel(0, False, False, minb=0) == "moeco_token_wise_000_0" and len(calls) == 2  # cached
    assert cuda_kernels._kernel(2, True, True) == "moeco_token_wise_211_0"  # fp32: no bound shipped
    assert calls[-1][1] == ["-DIN_KIND=2", "-DGATHER=1", "-DPOW2=1"] and len(calls) == 3
    with pytest.raises(TypeError):
        cuda_kernels.MIN_BLOCKS[0] = 4  # read-only: a sweep passes min_blocks instead


def test_dual_kernel_variants_reach_the_compiler(monkeypatch):
    """`cuda_kernels.dual`'s variants: input kind, power-of-two scales and DUAL_MIN_BLOCKS (or `minb`) become NVRTC
    defines and part of the kernel's name and cache key; the source holds both outputs' stores."""
    from moeco.fp8 import cuda_kernels

    calls = []
    monkeypatch.setattr(cuda_kernels, "_dual_variants", cuda_kernels.CompiledVariants("dual", "the two kernels"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_compile_kernel", lambda src, name, nvcc_options: calls.append(
        (name, nvcc_options, f"void BOUNDS {name}(" in src)) or name, raising=False)
    assert cuda_kernels._dual_kernel(0, True) == "moeco_dual_quant_01_0"
    assert calls[-1] == ("moeco_dual_quant_01_0", ["-DIN_KIND=0", "-DPOW2=1"], True)
    assert cuda_kernels._dual_kernel(1, False, minb=3) == "moeco_dual_quant_10_3"
    assert calls[-1][1] == ["-DIN_KIND=1", "-DPOW2=0", "-DMINB=3"] and len(calls) == 2
    assert cuda_kernels._dual_kernel(0, True) == "moeco_dual_quant_01_0" and len(calls) == 2  # cached


def test_dual_quantization_off_cuda_is_the_two_functions():
    """Without CUDA, `quantize_act_1x128_dual` is exactly the pair it stands for (the NVRTC kernel is
    checked against the same pair bit for bit on the GPU, tests/test_fp8_gpu.py)."""
    from moeco.fp8 import cuda_kernels
    from moeco.fp8.quantize import quantize_act_1x128_dual, quantize_act_1x128_t

    x = (torch.randn(300, 200) * 5).to(torch.bfloat16)
    assert not cuda_kernels.dual_supported(x)
    (q, s), (qt, st) = quantize_act_1x128_dual(x, pow2_scale=True)
    q0, s0 = quantize_act_1x128(x, pow2_scale=True)
    qt0, st0 = quantize_act_1x128_t(x, pow2_scale=True)
    assert q.shape == (300, 200) and s.shape == (300, 2) and qt.shape == (200, 300) and st.shape == (200, 3)
    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)
    assert torch.equal(qt.view(torch.uint8), qt0.view(torch.uint8)) and torch.equal(st, st0)
