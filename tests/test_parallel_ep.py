"""Expert parallelism on 4 gloo processes (2 nodes x 2 GPUs) against the single-process reference."""

from __future__ import annotations

import pytest
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
        for key in ("y", "gx", "gw"):  # one summation order (moeco.parallel.dispatch): bit for bit
            assert torch.equal(d[key], h[key]), (r, key, (d[key] - h[key]).abs().max())
        sl = slice(r * T, (r + 1) * T)
        for o in (d, h):
            torch.testing.assert_close(o["y"], y_ref[sl].detach(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(o["gx"], xr.grad[sl], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(o["gw"], wr.grad[sl], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gpus_per_node", [1, 2, 4])
def test_dispatchers_agree_bit_for_bit_in_bf16(tmp_path, gpus_per_node):
    """BF16, 4 experts per rank, top-6, on 4 x 1, 2 x 2 and 1 x 4: output and gradients equal exactly."""
    T, D, E, K, W = 9, 16, 16, 6, 4
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(W * T)])
    res = run_ranks(dispatch_layer, W, T, D, E, K, gpus_per_node, idx, False, torch.bfloat16, out_dir=tmp_path)
    for r, out in enumerate(res):
        for key in ("x_CD", "y", "gx", "gw"):
            assert torch.equal(out["direct"][key], out["two_hop"][key]), (r, key)


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


@pytest.mark.slow
def test_ep_step_equals_single_process(tmp_path):
    """2 nodes x 2 GPUs, EP 4: logits, loss, every gradient, the norm and one AdamW step (fp32, 1e-5)."""
    from ep_workers import ep_step, reference_step
    from helpers import micro_config

    config = micro_config()
    res = run_ranks(ep_step, 4, config, ("direct", "two_hop"), 2, out_dir=tmp_path)
    ref = reference_step(config)
    for name in ("direct", "two_hop"):
        _check_against_reference([r[name] for r in res], ref, config, rtol=1e-5, atol=1e-5)
    for r in res:  # and each other, bit for bit (one summation order)
        d, h = r["direct"], r["two_hop"]
        assert torch.equal(d["logits"], h["logits"]) and torch.equal(d["loss"], h["loss"])
        for kind in ("grads", "params"):
            for n, t in d[kind].items():
                assert torch.equal(t, h[kind][n]), (kind, n)


def test_byte_counters_match_hand_counts(tmp_path):
    """Every rank routes token a to experts (0, 1, 6) and b to (2, 4, 5); 8 experts on 2 nodes x 2.

    Direct, per source: 6 copies, 3 to the other node, 1 or 2 to the node's other GPU: 12 inter and 6
    intra rows over the 4 ranks. Two-hop: each token crosses to the other node once (8 rows), and
    each forwarder sends 2 rows to its node's other GPU (8 rows). Combine sends the same rows back.
    """
    T, D, E, K, W = 2, 8, 8, 3, 4
    idx = torch.tensor([[0, 1, 6], [2, 4, 5]]).repeat(W, 1)
    res = run_ranks(dispatch_layer, W, T, D, E, K, 2, idx, out_dir=tmp_path)
    row = D * 4  # float32
    meta_row = (2 + K) * 8 + K * 4  # source, token, K expert ids (int64) + K gate weights (float32)

    def total(name, kind, link):
        return sum(r[name]["bytes"].get((kind, link), 0) for r in res)

    for kind in ("dispatch", "combine"):
        assert total("direct", kind, "inter") == 12 * row and total("direct", kind, "intra") == 6 * row
        assert total("two_hop", kind, "inter") == 8 * row and total("two_hop", kind, "intra") == 8 * row
    assert total("direct", "meta", "inter") == 0
    # the counters' formula (moeco.parallel.traffic, what bench/ep_bytes.py uses) gives the same rows
    from moeco.parallel.traffic import rows_per_token

    rows = rows_per_token(idx, torch.arange(W * T) // T, E, 2, 2)
    for name in ("direct", "two_hop"):
        for link in ("inter", "intra"):
            assert int(rows[f"{name}_{link}"].sum()) * row == total(name, "dispatch", link)
    assert total("two_hop", "meta", "inter") == 8 * meta_row and total("two_hop", "meta", "intra") == 8 * meta_row


def test_fp8_payload_halves_bytes_and_matches_local_quantization(tmp_path):
    """FP8 dispatch: D bytes + D/128 scales per row instead of 4 D (fp32 here; 2 D for bf16); the copies
    are exactly the 1x128 quantize-dequantize of the tokens, and both dispatchers agree."""
    from moeco.fp8.quantize import dequantize_act_1x128, quantize_act_1x128

    T, D, E, K, W = 3, 256, 8, 3, 4
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(W * T)])
    res = run_ranks(dispatch_layer, W, T, D, E, K, 2, idx, True, out_dir=tmp_path)
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(W * T, D, generator=g)
    xq = dequantize_act_1x128(*quantize_act_1x128(x_all))
    rows = {tuple(r.tolist()) for r in xq}
    for out in res:
        assert torch.equal(out["direct"]["x_CD"], out["two_hop"]["x_CD"])
        assert all(tuple(r.tolist()) in rows for r in out["direct"]["x_CD"])
    for name in ("direct", "two_hop"):
        for link in ("intra", "inter"):  # the combine sends back as many rows as the dispatch sent out
            sent = sum(out[name]["bytes"].get(("dispatch", link), 0) for out in res)
            back = sum(out[name]["bytes"].get(("combine", link), 0) for out in res)
            assert sent * (D * 4) == back * (D + 4 * (D // 128))  # FP8 + scales out, fp32 back


def test_node_limited_placement(tmp_path):
    """4 nodes x 1 GPU, 4 routing groups, top-2 groups: no token's experts span more than 2 nodes."""
    from ep_workers import node_limit
    from helpers import micro_config

    config = micro_config(num_experts_per_tok=4)
    res = run_ranks(node_limit, 4, config, out_dir=tmp_path)
    reached = torch.cat(res)
    assert reached.max() <= config.topk_group and reached.max() == 2  # the limit binds and holds


@pytest.mark.slow
def test_fp8_dispatch_equals_single_process_fp8(tmp_path):
    """The FP8 recipe with FP8 dispatch (experts fed the received E4M3 as is) vs the single-process FP8 model.

    FP8's Wgrad scales 128x1 tiles along the tokens, so a weight gradient depends on which tokens one
    GEMM sees: a replicated layer on a data-parallel rank sees that rank's row (the reference: one
    micro-step per row), an expert sees every row's copies (the reference: the whole batch at once).
    Forward values and activation gradients are row-wise and match either way: logits and loss to 1e-5.
    Gradients: both dispatchers sum a token's K terms per rank and node first (the single process sums
    them in one pass), and the experts' Wgrad tiles span all rows' copies, so a gradient can differ in a
    last bit, which flips a quantized value by an E4M3 step (6%): they are held to FP8's resolution.
    The two dispatchers equal each other bit for bit."""
    from ep_workers import ep_step, reference_step
    from helpers import micro_config

    from moeco.parallel.expert_parallel import EXPERT_TAG

    config = micro_config(hidden_size=128)
    res = run_ranks(ep_step, 4, config, ("direct", "two_hop"), 2, "fp8", True, out_dir=tmp_path)
    per_row = reference_step(config, precision="fp8", per_row=True)
    whole = reference_step(config, precision="fp8")
    L = config.n_routed_experts // 4
    for name in ("direct", "two_hop"):
        for r, out in enumerate(r[name] for r in res):
            torch.testing.assert_close(out["logits"], per_row["logits"][r:r + 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["loss"][0], per_row["loss"], rtol=1e-5, atol=1e-5)
            for n, g in out["grads"].items():
                want = whole["grads"][n][r * L:(r + 1) * L] if EXPERT_TAG in n else per_row["grads"][n]
                torch.testing.assert_close(g, want, rtol=0, atol=0.07 * want.abs().max(),
                                           msg=lambda m: f"{name} rank {r} {n}: {m}")
    for r in res:
        assert torch.equal(r["direct"]["logits"], r["two_hop"]["logits"])
        for n, g in r["direct"]["grads"].items():
            assert torch.equal(g, r["two_hop"]["grads"][n]), n


def test_dead_rank_stops_the_others(tmp_path):
    from ep_workers import dead_rank

    res = run_ranks(dead_rank, 4, 20, out_dir=tmp_path, timeout_s=20, raise_errors=False)
    for r in range(3):
        out = res[r]["ok"]
        assert out["type"] == "PeerLost" and "peer rank died" in out["msg"] and out["s"] < 25, out


def test_ep_generation_equals_single_process(tmp_path):
    """Offline generation under EP 4 (each rank reads only its experts) gives the single process's tokens."""
    from ep_workers import build_model, ep_generate
    from helpers import micro_config

    from moeco.generate import generate

    model = build_model(micro_config()).eval()
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        want = generate(model, torch.tensor([[1, 5, 9, 13], [2, 4, 6, 8]]), 6)
    res = run_ranks(ep_generate, 4, str(tmp_path / "model"), "two_hop", out_dir=tmp_path / "r")
    for out in res:
        assert torch.equal(out, want)


def test_checkpoint_missing_one_ranks_experts_fails_on_every_rank(tmp_path):
    from ep_workers import build_model, ep_load_error
    from helpers import micro_config
    from safetensors.torch import load_file, save_file

    build_model(micro_config()).save_pretrained(tmp_path / "model")
    f = tmp_path / "model" / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(f)).items() if ".mlp.experts.7." not in k}  # rank 3's expert
    save_file(tensors, str(f), metadata={"format": "pt"})
    res = run_ranks(ep_load_error, 4, str(tmp_path / "model"), out_dir=tmp_path / "r")
    for out in res:
        assert out["type"] == "LoadError" and "experts.7." in out["msg"] and out["s"] < 30, out
        assert "\n" not in out["msg"]


def test_ranks_and_experts_without_tokens(tmp_path):
    from ep_workers import empty_rank

    res = run_ranks(empty_rank, 4, out_dir=tmp_path)
    for r, out in enumerate(res):
        for ok, tpe, gshape in out:
            assert ok and tpe == ([0, 0] if r == 2 else [3, 3]) and gshape[0] == (0 if r == 1 else 2)


def test_rank_init_on_meta_equals_the_single_process_slice():
    """The trainer's EP init: built on meta, sharded, then drawn: every weight equals the single-process
    model's (experts: the rank's slice) without the whole layer ever being allocated."""
    from moeco import Transformer
    from moeco.config import ModelConfig
    from moeco.parallel.expert_parallel import shard_experts
    from moeco.parallel.mesh import MeshSpec

    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(3)
    full = Transformer(cfg).state_dict()
    for r in range(4):
        torch.manual_seed(3)
        with torch.device("meta"):
            m = Transformer(cfg)
        shard_experts(m, MeshSpec(4, r, 2, 4))
        m.to_empty(device="cpu")
        m.reset_parameters()
        m.reset_buffers("cpu")
        for k, v in m.state_dict().items():
            ref = full[k]
            if ".mlp.experts." in k:
                ref = ref[r * v.shape[0]:(r + 1) * v.shape[0]]
            assert torch.equal(v, ref), (r, k)
    torch.manual_seed(4)
    assert not torch.equal(Transformer(cfg).state_dict()["model.layers.1.mlp.experts.w2_EDF"],
                           full["model.layers.1.mlp.experts.w2_EDF"])
