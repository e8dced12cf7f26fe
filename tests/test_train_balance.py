"""Auxiliary-loss-free balancing: the bias moves the right way; the balance-loss formula; a run balances."""

import torch

from moeco import ModelConfig, Transformer
from moeco.model.moe import Routing
from moeco.model.moe import sequence_balance_loss as model_balance_loss
from moeco.train.balance import BalanceHook, sequence_balance_loss

SMALL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
             num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8,
             num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
             max_position_embeddings=64, num_nextn_predict_layers=1, num_key_value_heads=None)


def test_hook_moves_bias_against_the_load_and_zeroes_counts():
    model = Transformer(ModelConfig.preset("tiny").replace(**SMALL))
    hook = BalanceHook(model, gamma=0.001)
    assert [layer for layer, _ in hook.routers] == [1, 2]  # layer 1 and the MTP layer (id 2)
    load = torch.tensor([10.0, 0.0, 4.0, 4.0, 4.0, 4.0, 4.0, 2.0])  # mean 4
    for _, gate in hook.routers:
        gate.tokens_per_expert.copy_(load)
    stats = hook.step()
    for _, gate in hook.routers:
        bias = gate.e_score_correction_bias
        assert bias[0] == -0.001 and bias[1] == 0.001 and bias[7] == 0.001  # over -> down, under -> up
        assert torch.all(bias[2:7] == 0)  # exactly balanced experts stay put
        assert torch.all(gate.tokens_per_expert == 0)
    assert stats == {"1": 2.5, "2": 2.5}
    # gamma = 0 records the load but leaves the bias alone
    off = BalanceHook(model, gamma=0.0)
    before = [g.e_score_correction_bias.clone() for _, g in off.routers]
    for _, gate in off.routers:
        gate.tokens_per_expert.copy_(load)
    off.step()
    assert all(torch.equal(b, g.e_score_correction_bias) for b, (_, g) in zip(before, off.routers))


def test_bias_changes_selection_only():
    model = Transformer(ModelConfig.preset("tiny").replace(**SMALL)).train()
    _, moe = next(model.moe_layers())
    x = torch.randn(10, SMALL["hidden_size"])
    base = moe.gate(x)
    moe.gate.e_score_correction_bias[0] = 10.0  # force expert 0 in
    moved = moe.gate(x)
    assert torch.all((moved.indices_TK == 0).any(-1))
    assert torch.equal(base.scores_TE, moved.scores_TE)  # the affinities (and so the gates) ignore the bias


def test_reference_balance_loss_matches_the_model_and_is_one_when_uniform():
    torch.manual_seed(0)
    B, T, E, K = 3, 5, 8, 2
    scores = torch.rand(B, T, E)
    topk = scores.topk(K, dim=-1).indices
    ref = sequence_balance_loss(scores, topk)
    routing = Routing(torch.ones(B * T, K), topk.reshape(B * T, K), scores.reshape(B * T, E))
    assert torch.allclose(ref, model_balance_loss(routing, B, E))
    # perfectly uniform affinities and loads give sum_i f_i P_i = 1
    uniform = torch.ones(1, 4, 4)
    assert torch.allclose(sequence_balance_loss(uniform, torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])),
                          torch.tensor(1.0))


def _router_run(gamma: float, steps: int = 150) -> list[float]:
    """Steps of routing a fixed skewed batch through a real router, the hook after each."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(**{**SMALL, "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
                                                "num_experts_per_tok": 4})
    model = Transformer(cfg).train()
    hook = BalanceHook(model, gamma=gamma)
    gate = hook.routers[0][1]
    x = torch.randn(512, cfg.hidden_size) + 3 * torch.randn(cfg.hidden_size)  # tokens share a direction
    ratios = []
    for _ in range(steps):
        gate(x)
        ratios.append(hook.step()["1"])
    return ratios


def test_gamma_lowers_the_max_over_mean_load():
    with_bias, without = _router_run(0.001), _router_run(0.0)
    assert without[0] == with_bias[0] > 2.0  # skewed at the start, identically
    assert max(without) == min(without)  # gamma = 0: nothing changes
    assert sum(with_bias[-20:]) / 20 < 0.7 * without[-1]
