"""`moeco plan ...`: every subcommand on every preset and on hand-written configs of each family,
`--json` parses and has the issue's keys, bad input gives one line and exit code 2."""

import json
import runpy
from pathlib import Path

import pytest

from moeco.cli import main
from moeco.plan.arch import preset_names

HF_CONFIGS = runpy.run_path(str(Path(__file__).with_name("test_plan_configs.py")))["HF_CONFIGS"]
MOE_FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3")
MOE_PRESETS = ("tiny", "small", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3", "qwen3-30b-a3b", "mixtral-8x7b")


def run_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object on stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def config_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    paths = {}
    for family, raw in HF_CONFIGS.items():
        d = root / family
        d.mkdir()
        (d / "config.json").write_text(json.dumps(raw))
        paths[family] = str(d)
    return paths


MODEL_KEYS = {"params_total", "params_active", "params_mtp", "kv_cache_bytes_per_token", "train_flops_per_token",
              "forward_flops_per_token", "breakdown"}


@pytest.mark.parametrize("name", preset_names())
def test_model_on_every_preset(capsys, name):
    out = run_json(capsys, "model", name)
    assert MODEL_KEYS <= set(out)
    assert set(out["breakdown"]) >= {"attn_proj", "attn_core", "dense_mlp", "routed", "shared", "head"}


@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
def test_model_fit_local_on_every_family(capsys, config_dirs, family):
    path = config_dirs[family]
    assert MODEL_KEYS <= set(run_json(capsys, "model", path, "--kv-dtype", "fp8"))
    # also the config.json file itself, not only its directory
    assert run_json(capsys, "model", str(Path(path) / "config.json"))["params_total"] > 0
    for mode in ("train", "serve"):
        out = run_json(capsys, "fit", path, "--cluster", "1x2xRTX4090", "--mode", mode)
        assert {"per_gpu_gb", "fits", "margin_gb", "min_ep_that_fits", "verdict"} <= set(out)
    out = run_json(capsys, "local", path, "--device", "M4-Pro")
    assert {"tokens_per_s", "tokens_per_s_bound", "bytes_per_token"} <= set(out)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routing_and_ep_limit_on_moe_families(capsys, config_dirs, family):
    path = config_dirs[family]
    out = run_json(capsys, "routing", path, "--nodes", "2", "--gpus-per-node", "2", "--samples", "256")
    assert {"distinct_nodes_limited", "distinct_nodes_unlimited", "inter_node_bytes_limited",
            "inter_node_bytes_unlimited", "time_us_limited", "time_us_unlimited", "sweep"} <= set(out)
    assert {"transfer_us", "tpot_ms", "tokens_per_s"} <= set(run_json(capsys, "ep-limit", path))
    out = run_json(capsys, "local", path, "--device", "Xeon-DDR5-2S", "--gpu", "RTX4090")
    assert out["hybrid"]["tokens_per_s"] > 0


@pytest.mark.parametrize("name", MOE_PRESETS)
def test_moe_presets_routing_fit_local_ep(capsys, name):
    nodes = 2 if name in ("mixtral-8x7b", "tiny") else 4
    out = run_json(capsys, "routing", name, "--nodes", str(nodes), "--gpus-per-node", "2", "--samples", "256")
    assert out["distinct_nodes_limited"] <= out["distinct_nodes_unlimited"] + 1e-9
    assert run_json(capsys, "ep-limit", name)["tokens_per_s"] > 0
    assert "fits" in run_json(capsys, "fit", name, "--cluster", "4x8xH800", "--mode", "serve", "--precision", "fp8")
    assert "fits" in run_json(capsys, "fit", name, "--cluster", "2x8xH100", "--precision", "fp8")
    assert run_json(capsys, "local", name, "--device", "DGX-Spark")["tokens_per_s"] > 0


@pytest.mark.parametrize("name", ["qwen2.5-72b", "llama-3.1-405b", "llama-3.1-70b"])
def test_dense_presets_fit_and_local(capsys, name):
    assert "fits" in run_json(capsys, "fit", name, "--cluster", "2x8xH200", "--mode", "serve")
    assert run_json(capsys, "local", name, "--device", "M4-Max", "--weight-bits", "8")["tokens_per_s"] > 0


def test_ep_limit_json_reproduces_the_paper(capsys):
    """ISCA §2.3.2 through the CLI: defaults are the paper's setting."""
    out = run_json(capsys, "ep-limit")
    assert round(out["transfer_us"], 2) == 120.96 and round(out["tpot_ms"], 2) == 14.76
    assert int(out["tokens_per_s"]) == 67
    out = run_json(capsys, "ep-limit", "--bandwidth", "900")
    assert round(out["transfer_us"], 2) == 6.72 and round(out["tpot_ms"], 2) == 0.82
    out = run_json(capsys, "ep-limit", "--link", "nvl72", "--hidden", "7168")
    assert out["transfer_us"] == pytest.approx(6.8813, abs=1e-3)


def test_ep_step_and_ep_limit_overlap(capsys):
    out = run_json(capsys, "ep-step", "--compute-ms", "10", "--intra-bytes", "30e6", "--inter-bytes", "12e6",
                   "--intra-gbs", "15", "--inter-gbs", "4", "--overlap", "0.6")
    assert out["comm_ms"] == pytest.approx(5) and out["step_ms"] == pytest.approx(12)
    assert out["step_ms_no_overlap"] == pytest.approx(15) and out["step_ms_full_overlap"] == pytest.approx(10)
    assert run_json(capsys, "ep-step", "--compute-ms", "3")["step_ms"] == 3  # no bytes: compute alone
    out = run_json(capsys, "ep-limit", "--compute-us", "100", "--overlap", "0")
    assert out["tpot_ms"] == pytest.approx(12.2 + 14.75712)
    assert round(run_json(capsys, "ep-limit", "--compute-us", "100")["tpot_ms"], 2) == 14.76
    assert main(["plan", "ep-step", "--compute-ms", "10", "--inter-bytes", "1e6", "--inter-gbs", "2"]) == 0
    assert "step" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["ft2", "ft3", "mpft", "mrft", "slimfly", "dragonfly"])
def test_topology_json_keys(capsys, name):
    out = run_json(capsys, "topology", name)
    assert {"endpoints", "switches", "links", "cost_usd", "cost_per_endpoint_usd"} <= set(out)
    cheap = run_json(capsys, "topology", name, "--switch-cost", "1000", "--link-cost", "10", "--endpoint-cost", "5")
    assert cheap["cost_usd"] < out["cost_usd"]


def test_topology_all_and_paper(capsys):
    assert len(run_json(capsys, "topology", "all")["topologies"]) == 6
    out = run_json(capsys, "paper")
    assert out["reproduced"] >= 30 and out["differs"] == 3 and out["rows"]


def test_fit_deepseek_v3_serving_on_4x8_h800(capsys):
    """The example users type: V3 in FP8 on 32 H800s fits, with EP32, and leaves room for the latent cache."""
    out = run_json(capsys, "fit", "deepseek-v3", "--cluster", "4x8xH800", "--mode", "serve", "--precision", "fp8")
    assert out["fits"] and out["ep"] == 32 and out["min_ep_that_fits"] == 16
    assert 35 < out["per_gpu_gb"]["weights"] < 45  # 671B in FP8 (embedding/head BF16) / 32 + non-experts
    assert out["kv_tokens_per_gpu"] > 100_000 and out["concurrent_sequences"] > 1000
    bf16 = run_json(capsys, "fit", "deepseek-v3", "--cluster", "4x8xH800", "--mode", "serve")
    assert not bf16["fits"] and bf16["min_tp_that_fits"] == 2  # BF16 weights need TP2 for non-experts
    train = run_json(capsys, "fit", "deepseek-v3", "--cluster", "4x8xH800", "--precision", "fp8")
    assert not train["fits"] and train["min_ep_that_fits"] is None


def test_fit_v3_training_layout_of_the_paper(capsys):
    """TR §3.2: V3 trained on 2048 H800 with PP16 and EP64: our estimate fits in 80 GB."""
    out = run_json(capsys, "fit", "deepseek-v3", "--cluster", "256x8xH800", "--pp", "16", "--ep", "64",
                   "--precision", "fp8")
    assert out["fits"] and out["dp"] == 128
    no_pp = run_json(capsys, "fit", "deepseek-v3", "--cluster", "256x8xH800", "--precision", "fp8")
    assert not no_pp["fits"] and 1 < no_pp["min_pp_that_fits"] <= 16


def test_fit_dense_serving_needs_tp(capsys):
    out = run_json(capsys, "fit", "llama-3.1-405b", "--cluster", "2x8xH200", "--mode", "serve")
    assert not out["fits"] and out["min_tp_that_fits"] == 8
    assert run_json(capsys, "fit", "llama-3.1-405b", "--cluster", "2x8xH200", "--mode", "serve", "--tp", "8")["fits"]


def test_plain_tables_print(capsys):
    for argv in (["model", "deepseek-v3"], ["paper"], ["ep-limit"], ["topology", "all"],
                 ["routing", "deepseek-v3", "--nodes", "8", "--gpus-per-node", "8", "--samples", "512"],
                 ["fit", "deepseek-v3", "--cluster", "4x8xH800", "--mode", "serve", "--precision", "fp8"],
                 ["local", "deepseek-v3", "--device", "Xeon-DDR5-2S", "--gpu", "RTX4090"], ["hardware"]):
        assert main(["plan", *argv]) == 0
    out = capsys.readouterr().out
    assert "120.96 us" in out and "70,272 B" in out and "reproduced" in out and "fits" in out


def test_plots(tmp_path, capsys):
    for argv in (["model", "deepseek-v3"], ["topology", "mpft"],
                 ["routing", "deepseek-v3", "--nodes", "8", "--gpus-per-node", "8", "--samples", "256"]):
        png = tmp_path / f"{argv[0]}.png"
        assert main(["plan", *argv, "--plot", str(png), "--json"]) == 0
        json.loads(capsys.readouterr().out)  # the "wrote" note goes to stderr under --json
        assert png.stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["model", "no-such-model"], "neither a preset"),
    (["model", "deepseek-v3", "--seq-len", "0"], "--seq-len"),
    (["fit", "deepseek-v3", "--cluster", "4x8xH900"], "unknown device 'H900'"),
    (["fit", "deepseek-v3", "--cluster", "four"], "NODESxGPUS"),
    (["fit", "deepseek-v3", "--cluster", "4x8", "--ep", "3"], "--ep = 3"),
    (["fit", "deepseek-v3", "--cluster", "4x8", "--hardware", "/no/such.toml"], "does not exist"),
    (["local", "deepseek-v3", "--device", "toaster"], "unknown device"),
    (["local", "deepseek-v3", "--device", "M4-Max", "--weight-bits", "0"], "--weight-bits"),
    (["local", "llama-3.1-70b", "--device", "Xeon-DDR5-2S", "--gpu", "RTX4090"], "dense"),
    (["ep-limit", "--link", "carrier-pigeon"], "unknown link"),
    (["ep-limit", "--bandwidth", "0"], "--bandwidth"),
    (["ep-limit", "--hidden", "0"], "--hidden"),
    (["fit", "deepseek-v3", "--cluster", "4x8", "--context", "0"], "--context"),
    (["fit", "deepseek-v3", "--cluster", "4x8", "--pp", "5"], "--pp = 5"),
    (["routing", "deepseek-v3", "--nodes", "8", "--gpus-per-node", "8", "--max-nodes", "9"], "--max-nodes"),
    (["ep-limit", "llama-3.1-70b"], "no routed experts"),
    (["ep-limit", "--overlap", "0.5"], "needs --compute-us"),
    (["ep-step", "--compute-ms", "-2"], "--compute-ms = -2"),
    (["ep-step", "--compute-ms", "1", "--overlap", "2"], "--overlap = 2"),
    (["ep-step", "--compute-ms", "1", "--inter-bytes", "5e6"], "--inter-gbs is missing"),
    (["ep-step", "--compute-ms", "1", "--inter-bytes", "5e6", "--inter-gbs", "0"], "--inter-gbs = 0"),
    (["routing", "deepseek-v3", "--nodes", "3", "--gpus-per-node", "8"], "divide"),
    (["routing", "qwen2.5-72b", "--nodes", "2", "--gpus-per-node", "8"], "no routed experts"),
    (["topology", "slimfly", "--q", "30"], "q = 30"),
    (["topology", "ft2", "--radix", "3"], "radix"),
    (["model", "deepseek-v3", "--plot", "/no/such/dir/x.png"], "does not exist"),
])
def test_user_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("raw, field", [
    ({"model_type": "gpt_neox", "hidden_size": 8}, "model_type"),
    ({"model_type": "qwen2", "hidden_size": 100, "num_attention_heads": 3, "num_hidden_layers": 2,
      "vocab_size": 10, "intermediate_size": 8}, "hidden_size"),
    ({"model_type": "deepseek_v3", "n_routed_experts": 10, "n_group": 3}, "n_group"),
])
def test_bad_config_files_are_one_line_exit_2(capsys, tmp_path, raw, field):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert main(["plan", "model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert field in err and err.count("\n") == 1
    (tmp_path / "config.json").write_text("{not json")
    assert main(["plan", "model", str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
