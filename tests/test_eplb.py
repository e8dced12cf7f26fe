"""EPLB: DeepSeek's README example reproduced, the balance it buys on a skewed trace, placements that
leave the model's output unchanged, the trace readers, and `moeco plan eplb` with its errors."""

import copy
import json

import pytest
import torch

import moeco
from helpers import micro_config
from moeco.cli import main
from moeco.errors import ConfigError, DataError
from moeco.model.moe import LocalDispatcher, Routing
from moeco.parallel import eplb

# The worked example of DeepSeek's EPLB README (and of docs/planner.md): 2 layers of 12 experts in
# 4 groups, 16 physical experts on 2 nodes x 4 GPUs.
README_LOAD = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                               [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def _check_consistent(load, phy2log, log2phy, count, gpus, nodes=1, groups=1):
    L, E = load.shape
    R = phy2log.shape[1]
    assert (count >= 1).all() and (count.sum(1) == R).all()  # every expert keeps a replica
    for layer in range(L):
        assert torch.equal(torch.bincount(phy2log[layer], minlength=E), count[layer])
        for e in range(E):
            slots = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert len(slots) == count[layer, e] and (phy2log[layer, slots] == e).all()
    if groups % nodes == 0 and nodes > 1:  # hierarchical: a group's replicas all live on one node
        node_LR = torch.arange(R).expand(L, R) // (R // nodes)
        group_LR = phy2log // (E // groups)
        for layer in range(L):
            for g in range(groups):
                assert len(set(node_LR[layer][group_LR[layer] == g].tolist())) == 1


def test_readme_example():
    phy2log, log2phy, count = eplb.rebalance(README_LOAD, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert torch.equal(phy2log, README_PHY2LOG)
    assert count[0].tolist() == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]
    _check_consistent(README_LOAD, phy2log, log2phy, count, gpus=8, nodes=2, groups=4)
    per_layer, overall = eplb.imbalance(eplb.gpu_loads(README_LOAD, phy2log, 8))
    assert per_layer == pytest.approx([1.2081, 1.2422], abs=1e-4) and overall == pytest.approx(1.2261, abs=1e-4)
    assert eplb.gpu_loads(README_LOAD, phy2log, 8)[0].tolist() == [121.5, 86.5, 125, 113, 147.5, 131.5, 156, 152]
    no_replicas, _ = eplb.imbalance(eplb.gpu_loads(README_LOAD, torch.arange(12), 4))
    assert no_replicas == pytest.approx([1.2778, 1.7855], abs=1e-4)


def _skewed(L=3, E=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2  # a few hot experts, a long tail
    return torch.stack([zipf[torch.randperm(E, generator=g)] * 10_000 for _ in range(L)]).round()


@pytest.mark.parametrize("nodes, gpus, groups, replicas", [(2, 8, 4, 40), (4, 8, 2, 40), (1, 4, 1, 32),
                                                           (2, 4, 8, 48)])
def test_skewed_trace_gets_balanced(nodes, gpus, groups, replicas):
    load = _skewed()
    placement = eplb.Placement.plan(load, replicas, groups, nodes, gpus)
    assert placement.policy == ("hierarchical" if groups % nodes == 0 else "global")
    _check_consistent(load, placement.phy2log_LR, placement.log2phy_LEX, placement.replica_count_LE, gpus, nodes,
                      groups)
    r = eplb.report(load, placement)
    assert r["after"] < r["before"] and r["before"] > 1.5
    assert all(x["after"] < x["before"] for x in r["layers"])
    if groups == 1 and replicas == 32:  # no spare slot: only the packing helps, yet it does
        assert r["after"] < 0.8 * r["before"]


def test_more_replicas_never_hurt_the_global_policy_much():
    load = _skewed(E=64)
    ratios = [eplb.report(load, eplb.Placement.plan(load, 64 + 8 * k, 1, 1, 8))["after"] for k in range(4)]
    assert ratios[-1] < ratios[0] and ratios[-1] < 1.1


def test_bad_layouts_are_one_line_errors():
    load = _skewed(E=16)
    for kwargs, words in [(dict(num_replicas=18, num_gpus=4), "not divisible by 4 GPUs"),
                          (dict(num_replicas=12), "every expert needs a slot"),
                          (dict(num_groups=3, num_nodes=1), "does not divide 16 experts"),
                          (dict(num_gpus=6, num_nodes=4, num_replicas=24), "not a multiple of nodes")]:
        args = dict(num_replicas=20, num_groups=4, num_nodes=2, num_gpus=4) | kwargs
        with pytest.raises(ConfigError, match=words) as e:
            eplb.rebalance(load, **args)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="multiple of nodes"):
        eplb.rebalance(load, 24, 4, 3, 6, policy="hierarchical")
    eplb.rebalance(load, 24, 4, 3, 6)  # auto falls back to the global policy


def test_choose_replicas_spreads_copies_evenly():
    log2phy = torch.tensor([[0, 3, 5], [1, -1, -1], [2, 4, -1]])
    count = torch.tensor([3, 1, 2])
    idx = torch.tensor([[0, 2], [0, 1], [0, 2], [0, 2], [2, 1]])
    phys = eplb.choose_replicas(idx, log2phy, count)
    assert phys.tolist() == [[0, 2], [3, 1], [5, 4], [0, 2], [4, 1]]
    assert eplb.choose_replicas(idx, log2phy, count, offset=1)[0].tolist() == [3, 4]


@pytest.fixture(scope="module")
def micro_model():
    cfg = micro_config(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
    torch.manual_seed(0)
    model = moeco.Transformer(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    return model, cfg, ids, ref


@pytest.mark.parametrize("replicas, groups, nodes, gpus", [(8, 4, 2, 4), (12, 4, 2, 4), (9, 1, 1, 3)])
def test_placement_leaves_the_model_output_unchanged(micro_model, replicas, groups, nodes, gpus):
    model, cfg, ids, ref = micro_model
    model = copy.deepcopy(model)
    layer_ids = [i for i, _ in model.moe_layers()]
    load = _skewed(L=len(layer_ids), E=8, seed=replicas)
    placement = eplb.Placement.plan(load, replicas, groups, nodes, gpus, layer_ids)
    eplb.apply_placement(model, placement)
    for _, moe in model.moe_layers():
        assert moe.experts.w13_E2FD.shape[0] == replicas
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)


def test_replicas_share_a_hot_experts_copies():
    # 64 tokens all routed to expert 0 (of 4) with 2 replicas: each replica gets 32 copies.
    log2phy, count = torch.tensor([[0, 4], [1, -1], [2, -1], [3, -1]]), torch.tensor([2, 1, 1, 1])
    d = eplb.ReplicaDispatcher(LocalDispatcher(), log2phy, count)
    idx = torch.zeros(64, 1, dtype=torch.int64)
    _, tokens_per_expert, _ = d.dispatch(torch.randn(64, 8), Routing(torch.ones(64, 1), idx, torch.rand(64, 4)), 4)
    assert tokens_per_expert.tolist() == [32, 0, 0, 0, 32]
    with pytest.raises(ConfigError, match="placement is for 4 experts"):
        d.dispatch(torch.randn(64, 8), Routing(torch.ones(64, 1), idx, torch.rand(64, 6)), 6)


def _metrics(tmp_path, steps=3):
    rows = [{"step": s + 1, "expert_load": {"1": 1.0}, "expert_counts": {"1": [4 * s, 1, 0, 3], "2": [1, 1, 1, 1]}}
            for s in range(steps)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    return tmp_path / "metrics.jsonl"


def test_read_loads_every_format(tmp_path):
    path = _metrics(tmp_path)
    ids, load = eplb.read_loads(tmp_path)  # the run directory, a cut last line ignored
    assert ids == ["1", "2"] and load.tolist() == [[12, 3, 0, 9], [3, 3, 3, 3]]
    assert eplb.read_loads(path, last_steps=1)[1].tolist() == [[8, 1, 0, 3], [1, 1, 1, 1]]
    (tmp_path / "l.json").write_text(json.dumps({"3": [1, 2], "4": [3, 4]}))
    assert eplb.read_loads(tmp_path / "l.json") == (["3", "4"], pytest.approx(torch.tensor([[1., 2], [3, 4]])))
    torch.save(torch.tensor([5.0, 6.0, 7.0]), tmp_path / "l.pt")
    ids, load = eplb.read_loads(tmp_path / "l.pt")
    assert ids == ["0"] and load.tolist() == [[5, 6, 7]]
    for name, text, words in [("missing.json", None, "not found"), ("bad.json", "{", "not JSON"),
                              ("ragged.json", "[[1, 2], [3]]", "unequal"), ("neg.json", "[[-1, 2]]", "non-negative"),
                              ("old.jsonl", '{"step": 1, "expert_load": {"1": 1.2}}\n', "no step with expert_counts")]:
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=words):
            eplb.read_loads(tmp_path / name)


def test_cli_json_and_table(tmp_path, capsys):
    trace = tmp_path / "skewed.json"
    trace.write_text(json.dumps({str(i): row for i, row in enumerate(_skewed(E=16).tolist())}))
    assert main(["plan", "eplb", str(trace), "--nodes", "2", "--gpus-per-node", "2", "--replicas", "20",
                 "--groups", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "hierarchical" and out["gpus"] == 4 and len(out["layers"]) == 3
    assert out["after"] < out["before"]
    assert main(["plan", "eplb", str(trace), "--nodes", "2", "--gpus-per-node", "2"]) == 0  # 16 + 4 replicas
    text = capsys.readouterr().out
    assert "before" in text and "global policy" in text


@pytest.mark.parametrize("argv, words", [
    (["--replicas", "18"], "not divisible by 4 GPUs"),
    (["--groups", "3"], "does not divide 16 experts"),
    (["--groups", "1", "--policy", "hierarchical", "--nodes", "3", "--replicas", "24"], "multiple of nodes"),
    (["--nodes", "0"], "--nodes = 0 is invalid"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, words):
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps([[1] * 16]))
    args = ["plan", "eplb", str(trace), "--nodes", "2", "--gpus-per-node", "2", *argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def test_cli_missing_trace(capsys):
    assert main(["plan", "eplb", "/nonexistent/metrics.jsonl", "--nodes", "1", "--gpus-per-node", "2"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_holdout_plans_from_earlier_steps(tmp_path, capsys):
    _metrics(tmp_path, steps=4)
    base = ["plan", "eplb", str(tmp_path), "--nodes", "1", "--gpus-per-node", "2", "--replicas", "4", "--json"]
    assert main([*base, "--holdout", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["holdout_steps"] == 1 and out["groups"] == 1
    assert [x["tokens"] for x in out["layers"]] == [16, 4]  # the last step only: 12 + 1 + 0 + 3
    assert main([*base, "--holdout", "4"]) == 2
    assert "too few to hold out 4" in capsys.readouterr().err


def test_dispatched_copies_follow_the_plan():
    # Skewed routing of 4096 tokens x top-4 over 32 experts; after the plan, the copies the
    # dispatcher actually sends per GPU match the planned loads to within one copy per replica.
    g = torch.Generator().manual_seed(3)
    probs = (1.0 / torch.arange(1, 33, dtype=torch.float64) ** 1.2)[torch.randperm(32, generator=g)]
    idx = torch.stack([torch.multinomial(probs, 4, generator=g) for _ in range(4096)])
    load = torch.bincount(idx.flatten(), minlength=32).double()
    placement = eplb.Placement.plan(load, 40, 4, 1, 8)  # one node: groups do not bind
    d = eplb.ReplicaDispatcher(LocalDispatcher(), placement.log2phy_LEX[0], placement.replica_count_LE[0])
    _, per_slot, _ = d.dispatch(torch.randn(4096, 2), Routing(torch.ones(4096, 4), idx, torch.rand(4096, 32)), 32)
    planned = eplb.gpu_loads(load, placement.phy2log_LR, 8)[0]
    sent = per_slot.double().view(8, 5).sum(1)
    assert (sent - planned).abs().max() <= 5
    before = eplb.gpu_loads(load, torch.arange(32), 8)[0]
    assert sent.max() / sent.mean() < 1.05 < 1.5 < before.max() / before.mean()


def test_balance_hook_records_the_trace_the_planner_reads(micro_model, tmp_path):
    from moeco.train.balance import BalanceHook

    model, cfg, _, _ = micro_model
    model = copy.deepcopy(model).train()
    hook = BalanceHook(model, gamma=0.0)
    model(torch.randint(0, cfg.vocab_size, (2, 16)))
    hook.step()
    counts = hook.last_counts
    assert set(counts) == {str(i) for i, _ in model.moe_layers()}
    # T x K copies in each decoder layer; the MTP layer ("3") runs only when asked for MTP logits
    assert [sum(c) for c in counts.values()] == [2 * 16 * 3, 2 * 16 * 3, 0]
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "expert_counts": counts}) + "\n")
    ids, load = eplb.read_loads(tmp_path)
    assert ids == list(counts) and load.sum(1).tolist() == [96.0, 96.0, 0.0]
