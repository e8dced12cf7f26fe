"""FP8 inference: keep DeepSeek's FP8 checkpoint weights as they are shipped.

DeepSeek's release stores every attention and FFN projection, routed experts included, as E4M3
plus a float32 `weight_scale_inv` per 128x128 block. `load_pretrained(..., keep_fp8=True)` builds
the model through `Fp8InferenceRecipe`, whose Linears (`Fp8InferenceLinear`) and routed experts
(`Fp8InferenceExperts`) hold those tensors unchanged: one byte per weight instead of BF16's two.

    CUDA: activations quantized 1x128 on the fly, FP8 GEMMs with the block scales (fp8_gemm)
    CPU:  the weights of the experts a batch touches are dequantized and the matmul runs in the
          activations' dtype (no FP8 arithmetic on CPUs), giving exactly the dequantized model;
          with backend="reference" the CPU emulates the CUDA arithmetic instead (tests use it)

The embedding, output head, router, norms and the MTP projection stay in the requested dtype, as
they are in the release.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeco.fp8.compute import expert_rows, fp8_grouped_gemm_loop
from moeco.fp8.linear import Fp8InferenceLinear
from moeco.fp8.quantize import FP8_DTYPE, dequantize_weight_128x128, quantize_act_1x128
from moeco.precision import HighPrecision

FP8_ROLES = frozenset({"attn_proj", "mlp", "shared_expert"})  # what the release ships in FP8


class Fp8InferenceExperts(nn.Module):
    """Routed experts with FP8 weights (E, F, D) / (E, D, F) and their (E, *, *) block scales."""

    def __init__(self, n_experts: int, dim: int, hidden: int, *, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        fb, db = -(-hidden // 128), -(-dim // 128)
        for name, shape, sshape in (("w1_EFD", (hidden, dim), (fb, db)), ("w3_EFD", (hidden, dim), (fb, db)),
                                    ("w2_EDF", (dim, hidden), (db, fb))):
            self.register_buffer(name, torch.zeros(n_experts, *shape, dtype=FP8_DTYPE))
            self.register_buffer(name + "_scale_inv", torch.ones(n_experts, *sshape, dtype=torch.float32))

    def _project(self, x_CD: torch.Tensor, xq, name: str, rows: list[tuple[int, int]]) -> torch.Tensor:
        """x . W_e^T per expert; xq = x's 1x128 FP8 tiles and scales on CUDA (quantized once), else None."""
        wq, ws = getattr(self, name), getattr(self, name + "_scale_inv")
        if xq is not None:
            return fp8_grouped_gemm_loop(*xq, wq, ws, rows, x_CD.dtype, self.backend)
        out = x_CD.new_zeros(x_CD.shape[0], wq.shape[1])
        for e, (r0, r1) in enumerate(rows):
            if r1 > r0:  # dequantize only the experts this batch uses
                out[r0:r1] = F.linear(x_CD[r0:r1], dequantize_weight_128x128(wq[e], ws[e], x_CD.dtype))
        return out

    def forward(self, x_CD: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        rows = expert_rows(tokens_per_expert.cumsum(0))
        fp8 = x_CD.is_cuda or self.backend == "reference"
        xq = quantize_act_1x128(x_CD) if fp8 else None  # shared by the gate and up projections
        h = F.silu(self._project(x_CD, xq, "w1_EFD", rows)) * self._project(x_CD, xq, "w3_EFD", rows)
        hq = quantize_act_1x128(h) if fp8 else None
        return self._project(h, hq, "w2_EDF", rows)


class Fp8InferenceRecipe(HighPrecision):
    """Builds FP8-weight Linears and experts for the roles DeepSeek ships in FP8; inference only."""

    name = "fp8-inference"

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def make_linear(self, in_features: int, out_features: int, *, bias: bool = False, role: str = "mlp") -> nn.Module:
        if role in FP8_ROLES:
            return Fp8InferenceLinear(in_features, out_features, bias, backend=self.backend)
        return super().make_linear(in_features, out_features, bias=bias, role=role)

    def make_experts(self, n_experts: int, dim: int, hidden: int) -> nn.Module:
        return Fp8InferenceExperts(n_experts, dim, hidden, backend=self.backend)


def fp8_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes held in FP8, bytes of every other parameter and buffer) of a model."""
    fp8 = other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        n = t.numel() * t.element_size()
        if t.dtype == FP8_DTYPE:
            fp8 += n
        else:
            other += n
    return fp8, other
