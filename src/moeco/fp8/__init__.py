"""Fine-grained FP8 (DeepSeek-V3 section 3.3): quantization, GEMM backends, Fp8Linear, the recipe.

    format.py          E4M3 constants and the 128 block size
    spec.py            the recipe's data: formats, kernel choices (validated), its weight cache
    quantize.py        1x128 activation tiles, 128x128 weight blocks, E4M3, fp32 or ue8m0 scales
    gemm.py            fp8_gemm: CPU reference with FP32 promotion every 128 of K, torch._scaled_mm
                       block-wise (Hopper), Triton, moeco's Hopper kernel; the limited-accumulator emulation
    triton_kernels.py  fused quantization and the block-scaled GEMMs in Triton
    cuda_kernels.py,   NVRTC kernels (CUDA C in csrc/): the 128x1 and dual quantizations, and the
    cuda_gemm.py       WGMMA GEMM
    grouped_wgrad.py   the routed experts' Wgrad (128x1 re-tiling + one grouped GEMM)
    compute.py         the Linear's and grouped GEMM's forward and backward, shared by:
    linear.py          Fp8Linear (Fprop, Dgrad, Wgrad in FP8), fp8_grouped_mm, Fp8InferenceLinear
    ops.py             the same as custom operators, for torch.compile
    recipe.py          Fp8Recipe, HighPrecisionRecipe, recipe_by_name
"""

from moeco.fp8.gemm import emulate_hopper_accumulation, fp8_gemm, fp8_gemm_reference
from moeco.fp8.linear import Fp8InferenceLinear, Fp8Linear, fp8_grouped_mm
from moeco.fp8.quantize import (
    dequantize_act_1x128,
    dequantize_weight_128x128,
    quantize_act_1x128,
    quantize_act_1x128_dual,
    quantize_act_1x128_t,
    quantize_weight_128x128,
)
from moeco.fp8.recipe import Fp8Recipe, HighPrecisionRecipe, recipe_by_name

__all__ = [
    "Fp8InferenceLinear", "Fp8Linear", "Fp8Recipe", "HighPrecisionRecipe", "dequantize_act_1x128",
    "dequantize_weight_128x128", "emulate_hopper_accumulation", "fp8_gemm", "fp8_gemm_reference",
    "fp8_grouped_mm", "quantize_act_1x128", "quantize_act_1x128_dual", "quantize_act_1x128_t",
    "quantize_weight_128x128", "recipe_by_name",
]
