"""EP speed limit (ISCA §2.3.2), local decode (ISCA §2.2.2), network topologies (ISCA Table 3), routing."""

import math

import pytest

from moeco import ConfigError
from moeco.plan import topology
from moeco.plan.hardware import get_device, get_link, load_catalog, parse_cluster
from moeco.plan.paper import TABLE3, reproduction_rows
from moeco.plan.routing import expected_distinct_nodes_uniform, routing_plan, sample_node_limited
from moeco.plan.speed import ep_comm_limit, ep_step, hybrid_split, local_decode


# ---- ISCA §2.3.2: EP communication limit ---------------------------------------------------
def test_isca_2_3_2_ep_limit_400g_infiniband():
    """ISCA §2.3.2: 120.96 us per step, 14.76 ms TPOT, 67 tokens/s on 400 Gb/s IB (hidden 7K, 61 layers)."""
    r = ep_comm_limit(hidden=7000, layers=61, bandwidth_gbs=get_link("ib-400g").bandwidth_gbs)
    assert r["transfer_us"] == pytest.approx(120.96, abs=1e-9)
    assert r["tpot_ms"] == pytest.approx(14.75712, abs=1e-9)
    assert round(r["tpot_ms"], 2) == 14.76
    assert math.floor(r["tokens_per_s"]) == 67


def test_isca_2_3_2_ep_limit_gb200_nvl72():
    """ISCA §2.3.2: GB200 NVL72 at 900 GB/s: 6.72 us, 0.82 ms TPOT, about 1200 tokens/s."""
    r = ep_comm_limit(7000, 61, get_link("nvl72").bandwidth_gbs)
    assert r["transfer_us"] == pytest.approx(6.72, abs=1e-9)
    assert round(r["tpot_ms"], 2) == 0.82
    assert r["tokens_per_s"] == pytest.approx(1219.75, abs=0.01)


def test_ep_limit_rejects_bad_values():
    with pytest.raises(ConfigError, match="bandwidth"):
        ep_comm_limit(7000, 61, 0)


def test_ep_limit_overlap_fraction():
    """Full overlap keeps the paper's 14.76 ms when the compute fits under the transfer; f = 0 adds the
    whole transfer to the compute; a partial f hides at most the compute."""
    assert ep_comm_limit(7000, 61, 50, compute_us=100)["tpot_ms"] == pytest.approx(14.75712, abs=1e-9)
    assert ep_comm_limit(7000, 61, 50, compute_us=100, overlap=1.0)["micro_batch_us"] == pytest.approx(120.96)
    none = ep_comm_limit(7000, 61, 50, compute_us=100, overlap=0.0)
    assert none["micro_batch_us"] == pytest.approx(220.96)
    assert none["tpot_ms"] == pytest.approx(61 * 2 * 100 / 1e3 + 14.75712)  # compute + the full transfer
    half = ep_comm_limit(7000, 61, 50, compute_us=100, overlap=0.5)  # hides 60.48 us of 120.96
    assert half["micro_batch_us"] == pytest.approx(100 + 120.96 - 60.48)
    assert ep_comm_limit(7000, 61, 50, compute_us=200)["micro_batch_us"] == pytest.approx(200)  # compute-bound
    with pytest.raises(ConfigError, match="--overlap = 0.5 needs --compute-us"):
        ep_comm_limit(7000, 61, 50, overlap=0.5)
    with pytest.raises(ConfigError, match="--overlap"):
        ep_comm_limit(7000, 61, 50, compute_us=1, overlap=1.5)


def test_ep_step_hand_computed():
    """The docstring's table: 30 MB at 15 GB/s + 12 MB at 4 GB/s = 2 + 3 ms of communication."""
    r = ep_step(10, intra_bytes=30e6, inter_bytes=12e6, intra_gbs=15, inter_gbs=4, overlap=0.6)
    assert (r["intra_ms"], r["inter_ms"], r["comm_ms"]) == pytest.approx((2, 3, 5))
    assert r["hidden_ms"] == pytest.approx(3) and r["step_ms"] == pytest.approx(12)
    assert r["step_ms_no_overlap"] == pytest.approx(15) and r["step_ms_full_overlap"] == pytest.approx(10)
    assert r["bound"] == "compute"
    assert ep_step(10, 30e6, 12e6, 15, 4, links="concurrent")["comm_ms"] == pytest.approx(3)
    # comm-bound: 5 ms of comm over 2 ms of compute; no more than the 2 ms of compute can be hidden
    assert [ep_step(2, 30e6, 12e6, 15, 4, f)["step_ms"] for f in (0, 0.2, 0.6, 1)] == pytest.approx([7, 6, 5, 5])
    assert ep_step(2, 30e6, 12e6, 15, 4)["bound"] == "communication"


def test_ep_step_reproduces_the_ep_limit():
    """V3 at 50 GB/s as one step (a layer's two micro-batches): f = 1 gives the paper's 241.92 us per
    layer whatever compute fits under it; f = 0 adds the full transfer."""
    per_layer = ep_comm_limit(7000, 61, 50)
    nbytes = 2 * per_layer["bytes_per_step"]
    full = ep_step(2 * 100e-3, inter_bytes=nbytes, inter_gbs=50, overlap=1.0)
    assert full["step_ms"] * 61 == pytest.approx(per_layer["tpot_ms"]) == pytest.approx(14.75712)
    none = ep_step(2 * 100e-3, inter_bytes=nbytes, inter_gbs=50, overlap=0.0)
    assert none["step_ms"] - none["compute_ms"] == pytest.approx(per_layer["layer_us"] / 1e3)


@pytest.mark.parametrize("kwargs, flag", [
    ({"compute_ms": -1}, "--compute-ms = -1"),
    ({"compute_ms": 1, "inter_bytes": -5, "inter_gbs": 1}, "--inter-bytes"),
    ({"compute_ms": 1, "intra_bytes": 10}, "--intra-gbs is missing"),
    ({"compute_ms": 1, "inter_bytes": 10, "inter_gbs": 0}, "--inter-gbs = 0"),
    ({"compute_ms": 1, "overlap": -0.1}, "--overlap = -0.1"),
    ({"compute_ms": 1, "overlap": float("nan")}, "--overlap = nan"),
    ({"compute_ms": 1, "links": "both"}, "--links"),
])
def test_ep_step_rejects_bad_values(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        ep_step(**kwargs)


# ---- ISCA §2.2.2: local deployment ----------------------------------------------------------
def test_isca_2_2_2_local_21b_active_moe_about_20_tps_on_256_gbs():
    """ISCA §2.2.2: a 21B-active MoE (DeepSeek-V2) at 4 bits on a 256 GB/s AI PC: nearly 20 TPS (bound ~24)."""
    r = local_decode("deepseek-v2", get_device("Ryzen-AI-Max-395"), weight_bits=4)
    assert 22 <= r["tokens_per_s_bound"] <= 26
    assert 17 <= r["tokens_per_s"] <= 22
    assert r["fits"]


def test_isca_2_2_2_local_70b_dense_single_digit():
    """ISCA §2.2.2: a 70B dense model on the same AI PC stays in single-digit TPS."""
    r = local_decode("llama-3.1-70b", get_device("Ryzen-AI-Max-395"), weight_bits=4)
    assert 1 <= r["tokens_per_s_bound"] < 10


def test_isca_2_2_2_m4_max_twice_that():
    """ISCA §2.2.2: 'or even twice that' on Apple M4 Max (546 GB/s)."""
    amd = local_decode("deepseek-v2", get_device("Ryzen-AI-Max-395"))["tokens_per_s"]
    m4 = local_decode("deepseek-v2", get_device("M4-Max"))["tokens_per_s"]
    assert m4 / amd == pytest.approx(546 / 256, rel=1e-6)


def test_hybrid_split_ktransformers_box():
    """Hybrid: V3 attention + shared on an RTX 4090, routed experts in the dual-Xeon DDR5 box (facts §5)."""
    h = hybrid_split("deepseek-v3", host=get_device("Xeon-DDR5-2S"), gpu=get_device("RTX4090"))
    assert h["fits"] and h["gpu_memory_needed_gb"] < 24
    assert h["host_bytes_per_token"] > h["gpu_bytes_per_token"]
    assert 20 < h["tokens_per_s_bound"] < 60
    with pytest.raises(ConfigError, match="dense"):
        hybrid_split("llama-3.1-70b", host=get_device("Xeon-DDR5-2S"), gpu=get_device("RTX4090"))


# ---- ISCA Table 3: topologies -----------------------------------------------------------------
@pytest.mark.parametrize("name", list(TABLE3))
def test_isca_table3_counts_exact(name):
    """ISCA Table 3: endpoints / switches / links for FT2, MPFT, FT3, SF, DF with radix-64 switches."""
    t = topology.build(name)
    assert (t.endpoints, t.switches, t.links) == TABLE3[name][:3]


@pytest.mark.parametrize("name", list(TABLE3))
def test_isca_table3_cost_per_endpoint_within_5_percent(name):
    """ISCA Table 3: cost per endpoint (k$) within 5% with the default (documented, fitted) prices."""
    c = topology.build(name).cost()
    assert c["cost_per_endpoint_usd"] == pytest.approx(TABLE3[name][4] * 1e3, rel=0.05)
    assert c["cost_usd"] == pytest.approx(TABLE3[name][3] * 1e6, rel=0.05)


def test_isca_table3_price_fit_matches_defaults():
    """ISCA Table 3: a two-price least-squares fit lands every column within 1.5%; defaults are it rounded."""
    s, l, worst = topology.fit_prices([(topology.build(n), v[4] * 1e3) for n, v in TABLE3.items()])
    assert worst < 0.015
    assert s == pytest.approx(topology.SWITCH_COST_USD, rel=0.01)
    assert l == pytest.approx(topology.LINK_COST_USD, rel=0.02)


def test_isca_5_1_mpft_cheaper_than_ft3_and_mrft():
    """ISCA §5.1: MPFT costs ~41% less per endpoint than FT3; a single-plane fat tree of 16K GPUs needs 3 levels."""
    mpft, ft3 = topology.build("mpft").cost(), topology.build("ft3").cost()
    assert 1 - mpft["cost_per_endpoint_usd"] / ft3["cost_per_endpoint_usd"] == pytest.approx(0.41, abs=0.02)
    mrft = topology.build("mrft")
    assert mrft.endpoints == 16_384 and mrft.params["levels"] == 3
    assert topology.multi_rail_fat_tree(64, planes=1).switches == topology.fat_tree_2(64).switches


def test_topology_bad_inputs():
    with pytest.raises(ConfigError, match="radix"):
        topology.fat_tree_2(7)
    with pytest.raises(ConfigError, match="q = 30"):
        topology.slim_fly(64, q=30)
    with pytest.raises(ConfigError, match="price"):
        topology.fat_tree_2().cost(switch_cost=-1)
    with pytest.raises(ConfigError, match="unknown topology"):
        topology.build("torus")


# ---- routing -----------------------------------------------------------------------------------
def test_routing_unlimited_matches_closed_form():
    """Plain top-8 of 256 on 8 nodes: N (1 - C(224, 8) / C(256, 8)) = 5.29 distinct nodes."""
    s = sample_node_limited(256, 8, 8, 8, max_nodes=8, samples=4096)
    assert s["distinct_nodes"] == pytest.approx(expected_distinct_nodes_uniform(256, 8, 8), abs=0.05)


def test_tr_2_1_2_node_limited_routing_caps_nodes_at_4():
    """TR §2.1.2: node-limited routing sends each token to at most M = 4 nodes; IB bytes drop accordingly."""
    r = routing_plan("deepseek-v3", nodes=8, gpus_per_node=8, samples=2048)
    assert r["max_nodes"] == 4
    assert r["limited"]["max_distinct_nodes"] <= 4
    assert r["distinct_nodes_limited"] < r["distinct_nodes_unlimited"]
    assert r["inter_node_bytes_limited"] < 0.8 * r["inter_node_bytes_unlimited"]
    assert r["max_experts_same_ib_cost"] == pytest.approx(12.8)  # TR §3.2.2: "up to 13 experts"


def test_routing_is_deterministic_and_seeded():
    a = sample_node_limited(64, 6, 4, 2, 2, samples=512, seed=3)
    b = sample_node_limited(64, 6, 4, 2, 2, samples=512, seed=3)
    assert a == b


def test_routing_bad_inputs():
    with pytest.raises(ConfigError, match="divide"):
        sample_node_limited(256, 8, 7, 8, 4)
    with pytest.raises(ConfigError, match="max-nodes"):
        sample_node_limited(256, 8, 8, 8, 9)
    with pytest.raises(ConfigError, match="no routed experts"):
        routing_plan("llama-3.1-70b", 2, 8)


# ---- hardware catalog --------------------------------------------------------------------------
def test_catalog_names_and_errors(tmp_path):
    assert get_device("h800").memory_gb == 80 and get_device("rtx-4090").name == "RTX4090"
    with pytest.raises(ConfigError, match="known: H800"):
        get_device("H900")
    with pytest.raises(ConfigError, match="NODESxGPUS"):
        parse_cluster("4by8")
    f = tmp_path / "hw.toml"
    f.write_text('[device.MyGPU]\nmemory_gb = 96\nbandwidth_gbs = 4000\nbf16_tflops = 148\n'
                 '[link.my-ib]\nbandwidth_gbs = 25\n[device.H800]\nmemory_gb = 96\n')
    cat = load_catalog(f)
    assert get_device("mygpu", cat).memory_gb == 96 and get_link("my-ib", cat).bandwidth_gbs == 25
    assert get_device("H800", cat).memory_gb == 96 and get_device("H800", cat).bandwidth_gbs == 3350
    f.write_text('[device.X]\nmemory_gb = 1\n')
    with pytest.raises(ConfigError, match="bandwidth_gbs"):
        load_catalog(f)


def test_paper_table_rows_have_status_and_expected_differences():
    rows = reproduction_rows()
    differs = {r["quantity"] for r in rows if r["status"] == "differs"}
    assert differs == {"KV ratio LLaMA-3.1-405B / V3", "train GFLOP/token qwen2.5-72b",
                       "train GFLOP/token llama-3.1-405b"}
    assert all(r["status"] in ("reproduced", "differs", "fitted") for r in rows)
