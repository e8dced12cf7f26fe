"""DeepSeekMoE routing rules, the grouped GEMM against its reference, and the balance term."""

import pytest
import torch

import moeco
from helpers import micro_config
from moeco.model.moe import MoE, Router, sequence_balance_loss
from moeco.precision import grouped_mm, grouped_mm_reference


def _router(**overrides):
    cfg = micro_config(**overrides)
    torch.manual_seed(5)
    gate = Router(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    return cfg, gate


@pytest.mark.parametrize("method, func, norm", [("noaux_tc", "sigmoid", True),
                                                ("group_limited_greedy", "softmax", False),
                                                ("group_limited_greedy", "sigmoid", True)])
def test_never_more_than_topk_group_groups(method, func, norm):
    cfg, gate = _router(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                        topk_method=method, scoring_func=func, norm_topk_prob=norm)
    if gate.e_score_correction_bias is not None:
        gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    r = gate(torch.randn(512, cfg.hidden_size))
    groups = r.indices_TK // cfg.experts_per_group
    distinct = torch.tensor([len(set(row)) for row in groups.tolist()])
    assert distinct.max() <= cfg.topk_group
    assert (r.indices_TK.sort(dim=1).values.diff(dim=1) > 0).all()  # no expert chosen twice


def test_v3_config_routes_to_at_most_4_groups_and_weights_sum_to_2_5():
    cfg = moeco.ModelConfig.preset("deepseek-v3").replace(hidden_size=64)
    gate = Router(cfg)
    torch.manual_seed(6)
    torch.nn.init.normal_(gate.weight, std=0.3)
    gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    r = gate(torch.randn(256, 64))
    assert r.indices_TK.shape == (256, 8)
    assert max(len(set(row)) for row in (r.indices_TK // 32).tolist()) <= 4
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.full((256,), 2.5))


def test_group_limited_greedy_scores_groups_by_their_max():
    cfg, gate = _router(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2,
                        topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False)
    x = torch.randn(64, cfg.hidden_size)
    r = gate(x)
    scores = (x @ gate.weight.t()).softmax(-1)
    best_group = scores.view(64, 4, 2).amax(-1).argmax(-1)
    assert ((r.indices_TK // 2) == best_group[:, None]).all()
    # softmax without normalisation: the weights are the raw scores times the scaling factor
    torch.testing.assert_close(r.weights_TK, scores.gather(1, r.indices_TK) * cfg.routed_scaling_factor)


def test_grouped_gemm_matches_reference_with_empty_groups():
    torch.manual_seed(7)
    x = torch.randn(40, 24)
    w = torch.randn(5, 16, 24)
    counts = torch.tensor([10, 0, 17, 0, 13])
    offs = counts.cumsum(0).to(torch.int32)
    loop = torch.cat([x[0:10] @ w[0].t(), x[10:27] @ w[2].t(), x[27:40] @ w[4].t()])
    torch.testing.assert_close(grouped_mm_reference(x, w, offs), loop)
    torch.testing.assert_close(grouped_mm(x, w, offs, backend="grouped_mm"), loop, atol=1e-5, rtol=1e-5)
    xb, wb = x.bfloat16(), w.bfloat16()
    torch.testing.assert_close(grouped_mm(xb, wb, offs, backend="grouped_mm").float(),
                               grouped_mm_reference(xb, wb, offs).float(), atol=0.1, rtol=0.02)


def test_moe_stages_match_a_per_token_loop_and_gradients_flow():
    cfg = micro_config()
    torch.manual_seed(8)
    moe = MoE(cfg, moeco.precision.DEFAULT_RECIPE)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 9, cfg.hidden_size, requires_grad=True)
    y = moe(x)
    # reference: every token through its experts one by one
    xt = x.detach().reshape(-1, cfg.hidden_size)
    r = moe.gate(xt)
    ref = moe.shared_experts(xt)
    e = moe.experts
    for t in range(xt.shape[0]):
        for k in range(cfg.num_experts_per_tok):
            j = r.indices_TK[t, k]
            F_ = cfg.moe_intermediate_size
            h = torch.nn.functional.silu(xt[t] @ e.w13_E2FD[j, :F_].t()) * (xt[t] @ e.w13_E2FD[j, F_:].t())
            ref[t] += r.weights_TK[t, k] * (h @ e.w2_EDF[j].t())
    torch.testing.assert_close(y.detach().reshape(-1, cfg.hidden_size), ref.detach(), atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert x.grad is not None and e.w13_E2FD.grad.abs().sum() > 0 and moe.gate.weight.grad.abs().sum() > 0
    x_sorted, counts, _ = moe.dispatch(xt, r)
    torch.testing.assert_close(e(x_sorted, counts), e.forward_reference(x_sorted, counts))


def test_router_counts_loads_only_in_training():
    cfg, gate = _router()
    gate.train()
    gate(torch.randn(10, cfg.hidden_size))
    assert gate.tokens_per_expert.sum() == 10 * cfg.num_experts_per_tok
    gate.eval()
    gate(torch.randn(10, cfg.hidden_size))
    assert gate.tokens_per_expert.sum() == 10 * cfg.num_experts_per_tok


def test_router_stays_float32_when_model_is_cast():
    model = moeco.Transformer(micro_config()).to(torch.bfloat16)
    _, moe = next(model.moe_layers())
    assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_sequence_balance_loss_formula():
    # 1 sequence, 2 tokens, 4 experts, top-1: token 0 -> expert 0, token 1 -> expert 0
    from moeco.model.moe import Routing

    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    r = Routing(torch.ones(2, 1), torch.tensor([[0], [0]]), scores)
    # f = [4/(1*2)*2, 0, 0, 0] = [4,0,0,0]; P_0 = mean(0.4, 0.1) = 0.25 -> L = 1.0
    assert sequence_balance_loss(r, batch=1, n_experts=4).item() == pytest.approx(1.0)
    # perfectly balanced routing and uniform scores give 1 as well (the minimum of sum f_i P_i)
    r = Routing(torch.ones(4, 1), torch.tensor([[0], [1], [2], [3]]), torch.full((4, 4), 0.25))
    assert sequence_balance_loss(r, batch=1, n_experts=4).item() == pytest.approx(1.0)


def test_model_returns_mtp_logits_and_balance_term():
    cfg = micro_config(num_nextn_predict_layers=2)
    model = moeco.Transformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    out = model(ids, return_mtp=True, return_aux=True)
    assert out.logits.shape == (2, 10, cfg.vocab_size)
    assert [t.shape for t in out.mtp_logits] == [(2, 9, cfg.vocab_size), (2, 8, cfg.vocab_size)]
    assert out.balance_loss.dim() == 0 and out.balance_loss.item() > 0
    (out.logits.mean() + sum(t.mean() for t in out.mtp_logits) + out.balance_loss).backward()
    assert model.mtp[1].eh_proj.weight.grad.abs().sum() > 0


def test_grouped_mm_follows_autocast():
    x = torch.randn(12, 16)
    w = torch.randn(3, 8, 16)
    offs = torch.tensor([4, 8, 12], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mm(x, w, offs)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), grouped_mm_reference(x, w, offs), atol=0.1, rtol=0.05)


def test_dispatch_combine_gathers_match_scatter_reference():
    """LocalDispatcher's gather-only dispatch/combine equals the plain index/index_add formulation,
    values and gradients (x, expert outputs, gate weights), on random routings with empty experts."""
    from moeco.model.moe import LocalDispatcher, Routing

    torch.manual_seed(7)
    T, K, E, D = 37, 3, 9, 5
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 2)[:K] for _ in range(T)])  # experts 7, 8 stay empty
    routing = Routing(w, idx, torch.rand(T, E))
    proj = torch.randn(D, D, dtype=torch.float64)

    d = LocalDispatcher()
    x_CD, counts, handle = d.dispatch(x, routing, E)
    assert counts.tolist() == torch.bincount(idx.flatten(), minlength=E).tolist()
    out = d.combine(torch.tanh(x_CD @ proj), handle)

    order = idx.flatten().argsort(stable=True)
    tok = order // K
    ref_x = x[tok]
    assert torch.equal(x_CD, ref_x)
    ref = torch.zeros(T, D, dtype=torch.float64).index_add(0, tok, torch.tanh(ref_x @ proj) * w.flatten()[order][:, None])
    torch.testing.assert_close(out, ref)
    g = torch.randn(T, D, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, w), g)
    want = torch.autograd.grad(ref, (x, w), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

    def dispatch_combine(x_, w_):
        y, _, h = d.dispatch(x_, Routing(w_, idx, routing.scores_TE), E)
        return d.combine(torch.tanh(y @ proj), h)

    assert torch.autograd.gradcheck(dispatch_combine, (x, w))


def _router_with_scores(scores_TE: torch.Tensor, **overrides):
    """A Router whose sigmoid scores are exactly `scores_TE`: identity gate weight, x = logit(scores)."""
    T, E = scores_TE.shape
    cfg = micro_config(hidden_size=E, n_routed_experts=E, **overrides)
    gate = Router(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(E))
    return gate, torch.logit(scores_TE.double()).float()


def test_noaux_tc_keeps_the_groups_with_the_best_top2_sum_not_the_best_max():
    """Group 0 holds the single best expert (max 0.95) but group 1 the best pair (0.8 + 0.75): V3 keeps
    group 1. The bias counts for the choice too: raising expert 5's choice score moves row 1 to group 2."""
    scores = torch.tensor([[0.95, 0.05, 0.80, 0.75, 0.30, 0.20, 0.10, 0.10],
                           [0.95, 0.05, 0.80, 0.75, 0.30, 0.20, 0.10, 0.10]])
    gate, x = _router_with_scores(scores, n_group=4, topk_group=1, num_experts_per_tok=2,
                                  topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True)
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
    r = gate(x[:1])
    assert sorted(r.indices_TK[0].tolist()) == [2, 3]  # a max-per-group rule would pick [0, 1]
    torch.testing.assert_close(r.weights_TK[0].sort().values,
                               torch.tensor([0.75, 0.80]) / 1.55 * gate.routed_scaling_factor)
    with torch.no_grad():
        gate.e_score_correction_bias[5] = 1.5  # group 2's top-2 sum becomes 0.3 + 1.7 = 2.0
    r = gate(x[1:])
    assert sorted(r.indices_TK[0].tolist()) == [4, 5]
    # the gate values are still the unbiased scores of the chosen experts, normalised and scaled
    torch.testing.assert_close(r.weights_TK[0].sort().values,
                               torch.tensor([0.20, 0.30]) / 0.5 * gate.routed_scaling_factor)


def test_one_routed_expert_with_norm_topk_prob_gets_weight_one_times_the_scaling_factor():
    """DeepSeek's reference and transformers renormalise a single chosen weight to 1 (sigmoid, norm_topk_prob)."""
    cfg, gate = _router(num_experts_per_tok=1, n_group=4, topk_group=2)
    gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    r = gate(torch.randn(64, cfg.hidden_size))
    torch.testing.assert_close(r.weights_TK, torch.full((64, 1), cfg.routed_scaling_factor))


def test_one_routed_expert_routes_as_transformers_router():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg, gate = _router(num_experts_per_tok=1, n_group=4, topk_group=2)
    gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    hf = DeepseekV3TopkRouter(hf_cfg)
    with torch.no_grad():
        hf.weight.copy_(gate.weight)
        hf.e_score_correction_bias.copy_(gate.e_score_correction_bias)
    x = torch.randn(64, cfg.hidden_size)
    _, hf_weights, hf_indices = hf(x)
    r = gate(x)
    assert torch.equal(r.indices_TK, hf_indices)
    torch.testing.assert_close(r.weights_TK, hf_weights)
