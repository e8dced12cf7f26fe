"""The paged MLA decode kernel against its reference: CPU under TRITON_INTERPRET=1, or CUDA."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede triton's import
pytest.importorskip("triton")

from moeco.serve import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("B,S,H,C,R,page,splits", [(3, 1, 4, 16, 8, 16, 1), (2, 2, 20, 32, 16, 16, 3),
                                                   (1, 1, 4, 16, 8, 16, 4)])
def test_kernel_matches_reference(B, S, H, C, R, page, splits):
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before triton is imported")
    g = torch.Generator().manual_seed(B * H + C)
    num_blocks = 12
    pool = torch.randn((num_blocks + 1) * page, C + R, generator=g).to(DEVICE)
    nb = 4
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:nb] for _ in range(B)]).to(DEVICE)
    pos = torch.randint(0, nb * page - S, (B, 1), generator=g) + torch.arange(S)[None]
    pos[0, -1] = -1 if B > 1 else pos[0, -1]  # a padding query: no keys, output 0
    pos = pos.to(DEVICE)
    ql = (torch.randn(B, S, H, C, generator=g) * 0.5).to(DEVICE)
    qr = (torch.randn(B, S, H, R, generator=g) * 0.5).to(DEVICE)
    got = kernels.paged_mla_decode(ql, qr, pool, tables, pos, 0.3, page, num_splits=splits)
    want = kernels.paged_mla_decode_reference(ql, qr, pool, tables, pos, 0.3, page)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
