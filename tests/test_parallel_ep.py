"""Expert parallelism on 4 gloo processes (2 nodes x 2 GPUs) against the single-process reference."""

from __future__ import annotations

import torch

from ep_workers import dispatch_layer
from parallel_helpers import run_ranks


def _reference_layer(x, w, idx, E):
    """y_t = sum_k w_tk (e_tk % L + 1) x_t with L experts per rank (the workers' fake experts)."""
    W = 4
    L = E // W
    factor = (idx % L + 1).float()
    return (w * factor).sum(1, keepdim=True) * x


def test_dispatchers_match_reference_and_each_other(tmp_path):
    T, D, E, K, W = 5, 8, 8, 3, 4
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(W * T)])
    res = run_ranks(dispatch_layer, W, T, D, E, K, 2, idx, out_dir=tmp_path)
    g = torch.Generator().manual_seed(1)
    x_all, w_all = torch.randn(W * T, D, generator=g), torch.rand(W * T, K, generator=g)
    xr = x_all.clone().requires_grad_()
    wr = w_all.clone().requires_grad_()
    y_ref = _reference_layer(xr, wr, idx, E)
    y_ref.pow(2).sum().backward()
    for r, out in enumerate(res):
        d, h = out["direct"], out["two_hop"]
        assert torch.equal(d["x_CD"], h["x_CD"]) and torch.equal(d["tpe"], h["tpe"])
        sl = slice(r * T, (r + 1) * T)
        for o in (d, h):
            torch.testing.assert_close(o["y"], y_ref[sl].detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(o["gx"], xr.grad[sl], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(o["gw"], wr.grad[sl], rtol=1e-6, atol=1e-6)


def _check_against_reference(res, ref, config, rtol, atol):
    from moeco.parallel.expert_parallel import EXPERT_TAG

    W = len(res)
    L = config.n_routed_experts // W
    for r, out in enumerate(res):
        torch.testing.assert_close(out["logits"], ref["logits"][r:r + 1], rtol=rtol, atol=atol)
        torch.testing.assert_close(out["loss"][0], ref["loss"], rtol=rtol, atol=atol)
        torch.testing.assert_close(out["norm"], ref["norm"], rtol=rtol, atol=atol)
        for kind in ("grads", "params"):
            assert set(out[kind]) == set(ref[kind]), kind
            for n, t in out[kind].items():
                want = ref[kind][n]
                if EXPERT_TAG in n:
                    first = out["first"][n.split(".experts.")[0]]
                    assert first == r * L
                    want = want[first:first + L]
                torch.testing.assert_close(t, want, rtol=rtol, atol=atol, msg=lambda m: f"rank {r} {kind} {n}: {m}")


def test_ep_step_equals_single_process(tmp_path):
    """2 nodes x 2 GPUs, EP 4: logits, loss, every gradient, the norm and one AdamW step (fp32, 1e-5)."""
    from ep_workers import ep_step, reference_step
    from helpers import micro_config

    config = micro_config()
    res = run_ranks(ep_step, 4, config, ("direct", "two_hop"), 2, out_dir=tmp_path)
    ref = reference_step(config)
    for name in ("direct", "two_hop"):
        _check_against_reference([r[name] for r in res], ref, config, rtol=1e-5, atol=1e-5)
