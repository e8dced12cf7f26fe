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


def _train_loads(gamma: float, steps: int = 60) -> list[float]:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny").replace(**{**SMALL, "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
                                                "num_experts_per_tok": 4, "num_nextn_predict_layers": 0})
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    hook = BalanceHook(model, gamma=gamma)
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 64, (256,), generator=gen)  # a skewed token distribution
    ratios = []
    for _ in range(steps):
        ids = base[torch.randint(0, 256, (8, 32), generator=gen)]
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        ratios.append(hook.step()["1"])
    return ratios


def test_gamma_lowers_the_max_over_mean_load():
    with_bias, without = _train_loads(0.001), _train_loads(0.0)
    tail = slice(-15, None)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(with_bias[tail]) < mean(without[tail])
