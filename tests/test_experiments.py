"""Each `moeco experiment` at its smallest setting: it runs, prints its table, writes JSON and PNG.

One micro model (trained once, 2 steps) is shared by the experiments that measure a trained model,
as `runs/base` next to their --out directories."""

import json

import pytest

from moeco.cli import main

MODEL = dict(hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, max_position_embeddings=128, vocab_size=384)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    from pydoc_data import topics

    root = tmp_path_factory.mktemp("experiments")
    (root / "corpus.txt").write_text("\n\n".join(topics.topics[n] for n in sorted(topics.topics)[:20]))
    return root


def _args(home, name, *extra):
    sets = [x for k, v in MODEL.items() for x in ("--set", f"model.{k}={v}")]
    return ["experiment", name, "--out", str(home / name), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
            "--data", str(home / "corpus.txt"), "--quiet", "--set", "log.eval_batches=1", *sets, *extra]


def _outputs(home, name):
    data = json.loads((home / name / f"{name}.json").read_text())
    assert (home / name / f"{name}.png").stat().st_size > 10_000
    assert data["tables"] and all(t["rows"] for t in data["tables"])
    assert data["hardware"] and data["date"]
    return data


def test_accumulation(home, capsys):
    assert main(_args(home, "accumulation", "--k", "256", "512", "--mn", "8", "--seeds", "1")) == 0
    data = _outputs(home, "accumulation")
    assert "FP8 GEMM accumulation" in capsys.readouterr().out
    r = data["results"]
    assert set(r) == {"uniform", "normal", "real"}
    for kind in r:
        for k in ("256", "512"):
            assert r[kind][k]["promotion_128"] < r[kind][k]["no_promotion"]


def test_logfmt(home):
    assert main(_args(home, "logfmt", "--codecs", "e4m3", "logfmt8", "logfmt10", "--train-codecs", "none",
                      "logfmt10", "--speed-shape", "8", "256", "--seeds", "2")) == 0
    data = _outputs(home, "logfmt")
    for point in ("dispatch", "combine"):
        c = data["error"]["points"][point]["codecs"]
        assert c["logfmt10"]["rel_rms"] < c["logfmt8"]["rel_rms"] < c["e4m3"]["rel_rms"]
    assert set(data["training"]) == {"none", "logfmt10"}
    t = data["training"]["logfmt10"]  # seed 1's runs are paired with each other, not with seed 0's
    ref = data["training"]["none"]["val_loss_by_seed"]
    assert t["gap_pct_by_seed"]["1"] == pytest.approx(100 * (t["val_loss_by_seed"]["1"] - ref["1"]) / ref["1"])
    assert data["speed"]["codecs"]["logfmt8"]["GB_per_s_of_bf16_input"] > 0


def test_balance(home):
    """Two seeds: each variant trains once per seed and its gap is paired with the aux-loss-free run of that seed."""
    assert main(_args(home, "balance", "--alphas", "0.01", "--seeds", "2")) == 0
    data = _outputs(home, "balance")
    r = data["results"]
    assert list(r) == ["aux-loss-free", "aux loss alpha=0.01", "neither"]
    assert all(v["late_load"] >= 1.0 for v in r.values())
    ref, other = r["aux-loss-free"]["val_loss_by_seed"], r["neither"]["val_loss_by_seed"]
    assert list(ref) == ["0", "1"] and ref["0"] != ref["1"]  # the seed reaches the run
    gaps = [100 * (other[s] - ref[s]) / ref[s] for s in ("0", "1")]
    assert r["neither"]["gap_pct_by_seed"] == pytest.approx(dict(zip(("0", "1"), gaps)))
    assert r["neither"]["gap_pct_mean"] == pytest.approx(sum(gaps) / 2)
    assert r["aux-loss-free"]["gap_pct_mean"] == 0
    assert (home / "balance" / "runs" / "neither-seed1").is_dir()


def test_node_limit(home):
    assert main(_args(home, "node-limit", "--nodes", "4", "--max-seqs", "4")) == 0
    data = _outputs(home, "node-limit")
    r = data["results"]
    ms = sorted(r, key=int)
    assert ms[0] == "1" and ms[-1] == "4"  # 2 experts per node, top-2: M = 1 suffices
    assert r["1"]["ib_copies"] <= r["4"]["ib_copies"] + 1e-9
    assert all(r[m]["nodes_per_token"] <= int(m) for m in ms)


def test_mtp(home):
    assert main(_args(home, "mtp", "--prompts", "2", "--prefix", "8", "--generate", "6")) == 0
    data = _outputs(home, "mtp")
    assert 0 <= data["acceptance_generated"] <= 1 and 0 < data["mtp_cost_ratio"] < 1


def test_bad_input_is_one_line(home, capsys):
    assert main(_args(home, "node-limit", "--nodes", "3")) == 2  # checked before any training
    assert "--nodes 3 is invalid: it must divide the 8 routed experts" in capsys.readouterr().err
    assert main(["experiment", "nope"]) == 2
    assert "does not exist; choose one of" in capsys.readouterr().err
    assert main(["experiment", "accumulation", "--k", "100", "--no-real", "--out", str(home / "bad")]) == 2
    assert "multiple of 128" in capsys.readouterr().err
