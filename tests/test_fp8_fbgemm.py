"""FBGEMM's grouped FP8 kernel as the experts' Fprop/Dgrad (moeco.fp8.fbgemm): the scale relayout on
CPU, the dispatch rules, and (GPU with fbgemm-gpu-genai installed) bit-equality with moeco's kernel."""

import pytest
import torch

from moeco.fp8 import fbgemm


def _group_scales_loop(a_scale, counts, T):
    """The layout FBGEMM reads, built expert by expert: (KB, M_e) blocks one after the other."""
    blocks, start = [], 0
    for n in list(counts) + [T - sum(counts)]:  # the rows past offs[-1] as one more block
        blocks.append(a_scale[start:start + n].t().reshape(-1))
        start += n
    return torch.cat(blocks)


@pytest.mark.parametrize("counts,T", [([5, 0, 9, 2], 16), ([3, 4], 10), ([0, 0, 7], 7), ([128, 1], 129)])
def test_group_scales_puts_each_expert_in_its_own_block(counts, T):
    gen = torch.Generator().manual_seed(len(counts) + T)
    KB = 3
    a_scale = torch.rand(KB, T, generator=gen).t()  # the (KB, T) buffer moeco's quantizer writes, as (T, KB)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    assert torch.equal(fbgemm.group_scales_reference(a_scale, offs), _group_scales_loop(a_scale, counts, T))


def test_fbgemm_mode_without_fbgemm_names_the_fix():
    from moeco.fp8.compute import grouped_impl

    with pytest.raises(RuntimeError, match="grouped_kernel='fbgemm' .* fbgemm-gpu-genai"):
        grouped_impl(torch.device("cpu"), "auto", "fbgemm")
    assert not fbgemm.available(torch.device("cpu"))
    assert fbgemm.fits(256, 7168, torch.bfloat16)
    assert not fbgemm.fits(576, 7168, torch.bfloat16) and not fbgemm.fits(256, 7168, torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and fbgemm.available(torch.device("cuda"))),
                    reason="needs a Hopper GPU and fbgemm-gpu-genai")
@pytest.mark.parametrize("tail", [0, 37])
def test_fbgemm_grouped_equals_moeco_kernel_bit_for_bit(tail):
    from moeco.fp8 import Fp8Recipe, fp8_grouped_mm
    from moeco.fp8.compute import grouped_impl

    gen = torch.Generator().manual_seed(5)
    counts = [300, 0, 1, 700, 128, 2000, 5, 0]
    E, N, K = len(counts), 512, 1024
    T = sum(counts) + tail
    offs = torch.tensor(counts).cumsum(0).to(torch.int32).cuda()
    x0 = torch.randn(T, K, generator=gen).to("cuda", torch.bfloat16)
    w0 = (torch.randn(E, N, K, generator=gen) * 0.02).cuda()
    gy = torch.randn(T, N, generator=gen).to("cuda", torch.bfloat16)
    res = {}
    for mode in ("triton", "fbgemm"):
        assert grouped_impl(x0.device, "auto", mode) == mode
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fp8_grouped_mm(x, w, offs, recipe=Fp8Recipe(grouped_kernel=mode))
        y.backward(gy)
        res[mode] = (y.detach(), x.grad, w.grad)
    for got, ref in zip(res["fbgemm"], res["triton"]):
        assert torch.equal(got, ref)
    if tail:
        assert (res["fbgemm"][0][-tail:] == 0).all() and (res["fbgemm"][1][-tail:] == 0).all()
    assert grouped_impl(x0.device, "auto", "auto") == "fbgemm"
    assert grouped_impl(x0.device, "auto", "auto", wgrad=True) == "triton"
