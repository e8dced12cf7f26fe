"""The CUDA C sources ship as files in the package and hold the kernels the Python code compiles."""

import fnmatch
import importlib.resources
import re
import tomllib
from pathlib import Path

import pytest

from moeco.fp8 import cuda_gemm, cuda_kernels

CSRC = importlib.resources.files("moeco.fp8") / "csrc"

# each source file -> names the host code relies on (the kernel entry is named per variant: KNAME)
EXPECTED = {
    "quant_helpers.cuh": ["f16_to_f32", "e4m3x2_to_f32", "f32x4_to_e4m3x4", "scale_of", "div_by",
                          "store_transposed", "BOUNDS"],
    "token_wise.cu": ['extern "C" __global__ void BOUNDS KNAME(', "unpack", "store_transposed<TC>"],
    "dual_quant.cu": ['extern "C" __global__ void BOUNDS KNAME(', "unpack4", "halve<8>", "store_transposed<128>"],
    "fp8_gemm_wgmma.cu": ['extern "C" __global__ void __launch_bounds__(384, 1) KNAME(', "WGMMA_ASM", "issue",
                          "promote", "store_rows", "tma_load_multicast", "unit_place"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_cuda_source_loads_with_its_kernels(name):
    text = (CSRC / name).read_text(encoding="utf-8")
    for want in EXPECTED[name]:
        assert want in text, f"{name} lacks {want!r}"


def test_the_compiled_text_is_the_files():
    """What NVRTC gets: the helpers + each quantization kernel, and the GEMM with its WGMMA call."""
    helpers = (CSRC / "quant_helpers.cuh").read_text(encoding="utf-8")
    assert cuda_kernels._SOURCE == helpers + (CSRC / "token_wise.cu").read_text(encoding="utf-8")
    assert cuda_kernels._DUAL_SOURCE == helpers + (CSRC / "dual_quant.cu").read_text(encoding="utf-8")
    gemm = cuda_gemm.source(128)
    assert "WGMMA_ASM" not in gemm and "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in gemm
    assert re.search(r"KNAME\(", gemm)


def test_every_cuda_source_is_package_data():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["moeco.fp8"]
    files = sorted(p.name for p in CSRC.iterdir() if p.name.endswith((".cu", ".cuh")))
    assert files == sorted(EXPECTED)
    for f in files:
        assert any(fnmatch.fnmatch(f"csrc/{f}", g) for g in globs), f"csrc/{f} is not in package-data"
