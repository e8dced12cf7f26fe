"""The expert-parallel benches at their smallest setting: bench/ep_bytes.py --run on a trained micro run."""

import importlib.util
import json
from pathlib import Path

import pytest

from moeco.cli import main

BENCH = Path(__file__).resolve().parents[1] / "bench"
MODEL = dict(hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, max_position_embeddings=128, vocab_size=384)


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    from pydoc_data import topics

    root = tmp_path_factory.mktemp("ep_bench")
    (root / "corpus.txt").write_text("\n\n".join(topics.topics[n] for n in sorted(topics.topics)[:20]))
    sets = [x for k, v in MODEL.items() for x in ("--set", f"model.{k}={v}")]
    assert main(["train", "--out", str(root / "run"), "--steps", "2", "--data", str(root / "corpus.txt"), "--quiet",
                 "--set", "train.batch_size=2", "--set", "data.seq_len=32", "--set", "log.eval_batches=1", *sets]) == 0
    return root / "run"


def test_ep_bytes_routes_with_a_trained_run(micro_run, capsys):
    """Per MoE layer and averaged, next to random routing; the trained router's group limit holds (1 of 2
    nodes), so two-hop sends at most one row between nodes per token, direct at least as many."""
    capsys.readouterr()
    assert load_bench("ep_bytes").main(["--run", str(micro_run), "--max-seqs", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["nodes"], res["gpus_per_node"]) == (2, 4)  # one node per routing group, 4 experts on 4 GPUs
    assert res["trained"]["moe_layers"] == 1 and res["trained"]["tokens_per_layer"] > 0
    rows = {(r["routing"], str(r["layer"]), r["dispatcher"]): r for r in res["rows"]}
    assert {k[:2] for k in rows} == {("trained", "1"), ("trained", "mean"), ("random, limited", "-"),
                                     ("random, no limit", "-")}
    mean = {d: rows["trained", "mean", d] for d in ("direct", "two-hop")}
    assert mean["two-hop"]["max_nodes"] == 1 and mean["two-hop"]["inter_rows"] <= 1
    assert mean["direct"]["inter_rows"] >= mean["two-hop"]["inter_rows"]
    assert mean["two-hop"]["planner_bytes"] > 0


def test_ep_bytes_bad_layout_is_one_line(micro_run, capsys):
    assert load_bench("ep_bytes").main(["--run", str(micro_run), "--nodes", "3", "--gpus-per-node", "1"]) == 2
    assert "do not split the 8 routed experts" in capsys.readouterr().err


def test_ep_local_small_runs(tmp_path, capsys):
    """bench/ep_local.py --small on a one-rank gloo group: every dispatcher timed, the overhead split."""
    out = tmp_path / "ep_local.json"
    assert load_bench("ep_local").main(["--small", "--cpu", "--tokens", "32", "--reps", "2", "--warmup", "1",
                                        "--backward", "--json", str(out)]) == 0
    assert "| 32 | two-hop |" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert [r["dispatcher"] for r in res["rows"]] == ["local", "direct", "two-hop", "direct fp8"]
    for r in res["rows"][1:]:
        assert r["count_exchange_ms"] > 0 and r["all_to_all_ms"] > 0
        assert abs(r["overhead_ms"] - r["count_exchange_ms"] - r["all_to_all_ms"] - r["rest_ms"]) < 1e-9
        assert r["rel_err"] < (0.1 if "fp8" in r["dispatcher"] else 1e-5)
    import torch.distributed as dist

    assert not dist.is_initialized()
