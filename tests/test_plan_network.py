"""The network in the planner: max-min fairness on hand-made graphs, the paper's qualitative network
results (ISCA Figs. 5, 8, Table 5, MPFT fault isolation), node-limited dispatch, CLI and bad input."""

import json

import numpy as np
import pytest

from moeco import ConfigError
from moeco.cli import main
from moeco.plan.network import make_network, simulate, sweep
from moeco.plan.network.collectives import moe_traffic
from moeco.plan.network.flows import FlowSet, complete, flowset_from_paths, max_min_rates
from moeco.plan.network.paper import TABLE5, point_to_point_us


def _fs(paths, sizes=None):
    return flowset_from_paths([[(tuple(p), 1.0)] for p in paths], sizes or [1.0] * len(paths))


# ---- flow-level basics -------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5])
def test_one_bottleneck_shared_by_n_flows_gives_each_one_nth(n):
    rates = max_min_rates(np.array([10.0]), _fs([[0]] * n))
    assert rates == pytest.approx([10.0 / n] * n)


def test_max_min_textbook_example():
    """Links A, B (capacity 1): f0 on A+B, f1 on A, f2 on B -> 1/2 each; with B = 2: f0 = f1 = 1/2, f2 = 3/2."""
    paths = [[0, 1], [0], [1]]
    assert max_min_rates(np.array([1.0, 1.0]), _fs(paths)) == pytest.approx([0.5, 0.5, 0.5])
    assert max_min_rates(np.array([1.0, 2.0]), _fs(paths)) == pytest.approx([0.5, 0.5, 1.5])
    # three links in a chain, a long flow and one short flow per link (Bertsekas-Gallager): 1/2 each;
    # raise the middle link to 3 and its short flow takes the 2.5 the long flow cannot use
    chain = [[0, 1, 2], [0], [1], [2]]
    assert max_min_rates(np.ones(3), _fs(chain)) == pytest.approx([0.5] * 4)
    assert max_min_rates(np.array([1.0, 3.0, 1.0]), _fs(chain)) == pytest.approx([0.5, 0.5, 2.5, 0.5])


def test_split_flow_counts_its_fraction_on_each_path():
    # one flow sprayed half/half over links 0 and 1 (capacity 1 each) reaches 2; with a second flow on link 0,
    # both grow together until link 0 is full: r/2 + r = 1, so 2/3 each (the split is fixed, not re-balanced)
    fs = flowset_from_paths([[((0,), 0.5), ((1,), 0.5)]], [1.0])
    assert max_min_rates(np.ones(2), fs) == pytest.approx([2.0])
    fs = flowset_from_paths([[((0,), 0.5), ((1,), 0.5)], [((0,), 1.0)]], [1.0, 1.0])
    assert max_min_rates(np.ones(2), fs) == pytest.approx([2 / 3, 2 / 3])


def test_completion_reallocates_freed_bandwidth():
    # two flows on one link of capacity 1: sizes 1 and 3 -> the small one ends at 2, the big one at 4
    done = complete(np.array([1.0]), _fs([[0], [0]], [1.0, 3.0]))
    assert done.time_ns == pytest.approx(4.0) and done.events == 2
    assert done.max_utilization(np.array([1.0])) == pytest.approx(1.0)


def test_event_driven_equals_busiest_link_bound_on_ecmp_all_to_all():
    """The shortcut used above EVENT_FLOWS flows, checked against the events on a random ECMP case."""
    from moeco.plan.network.collectives import collective_phases
    from moeco.plan.network.latency import latency_model
    from moeco.plan.network.paths import route

    net = make_network("ft2", 16, radix=6, gpus_per_node=2)
    ph = collective_phases(net, "all-to-all", 1e6, None, "ring")[0][0]
    flows, sizes, _, _ = route(net, ph.src, ph.dst, ph.nbytes, "ecmp", latency_model(net.nic, net.nvlink),
                               np.random.default_rng(3), 2)
    fs, cap = flowset_from_paths(flows, sizes), np.asarray(net.cap_gbs)
    exact = complete(cap, fs)
    assert exact.events > 3
    assert exact.time_ns == pytest.approx(complete(cap, fs, max_event_flows=0).time_ns, rel=1e-9)


# ---- the paper's qualitative results --------------------------------------------------------------
@pytest.mark.parametrize("gpus", [32, 128])
def test_isca_fig5_mpft_and_mrft_all_to_all_within_5_percent(gpus):
    """ISCA Fig. 5: NCCL all-to-all on MPFT and MRFT, 32-128 GPUs, large messages: very similar."""
    bw = {t: simulate(make_network(t, gpus, radix=16), "all-to-all", 2 ** 32, "static")["bus_bandwidth_gbps"]
          for t in ("mpft", "mrft")}
    assert bw["mpft"] == pytest.approx(bw["mrft"], rel=0.05)
    assert bw["mpft"] > 45  # NIC-bound near the 50 GB/s of a 400G NIC, not a spine-bound fraction of it


def test_mrft_without_pxn_under_ecmp_is_not_free():
    """The similarity is PXN's doing: MRFT sending cross-rail traffic over ECMP-hashed spines loses bandwidth."""
    net = make_network("mrft", 32, radix=8)
    pxn = simulate(net, "all-to-all", 2 ** 30, "ecmp", seeds=2)["bus_bandwidth_gbps"]
    spines = simulate(net, "all-to-all", 2 ** 30, "ecmp", seeds=2, pxn=False)["bus_bandwidth_gbps"]
    assert spines < 0.97 * pxn


@pytest.mark.parametrize("tp", [8, 2])
def test_isca_fig8_ecmp_below_adaptive_and_static_on_roce(tp):
    """ISCA Fig. 8: RoCE all-gather (and reduce-scatter) with ECMP clearly below adaptive and static routing."""
    net = make_network("ft2", 128, link="roce")
    bw = {m: simulate(net, coll, 2 ** 30, m, tp=tp, seeds=4)["bus_bandwidth_gbps"]
          for m in ("ecmp", "adaptive", "static") for coll in ("all-gather",)}
    rs = simulate(net, "reduce-scatter", 2 ** 30, "ecmp", tp=tp, seeds=4)["bus_bandwidth_gbps"]
    assert bw["static"] == pytest.approx(bw["adaptive"], rel=0.05)
    assert bw["adaptive"] > 45
    assert 0.2 * bw["adaptive"] < bw["ecmp"] < 0.8 * bw["adaptive"]  # paper: ECMP/AR ~0.5-0.8
    assert rs == pytest.approx(bw["ecmp"], rel=1e-6)  # the same traffic, reversed


@pytest.mark.parametrize("link", ["ib", "roce"])
def test_isca_table5_latency_reproduced_and_ib_below_roce(link):
    """ISCA Table 5: 64 B latency same leaf / cross leaf (the model's inputs come back as outputs)."""
    for where, same in (("same leaf", True), ("cross leaf", False)):
        assert point_to_point_us(link, same) == pytest.approx(TABLE5[(link, where)], abs=0.01)
    for same in (True, False):
        assert point_to_point_us("ib", same) < point_to_point_us("roce", same)


def test_small_message_all_to_all_is_latency_bound_and_ib_beats_roce():
    ib, roce = (sweep(make_network("ft2", 16, link=k, radix=6, gpus_per_node=4), "all-to-all", [64.0, 2.0 ** 30],
                      "adaptive") for k in ("ib", "roce"))
    assert ib[0]["time_us"] < roce[0]["time_us"]
    assert ib[0]["bus_bandwidth_gbps"] < 0.01 * ib[1]["bus_bandwidth_gbps"]


def test_mpft_failed_plane_keeps_about_p_minus_1_over_p():
    """MPFT isolates faults: losing one of 8 planes keeps ~7/8 of all-to-all bandwidth, not zero."""
    net = make_network("mpft", 32)
    r = simulate(net, "all-to-all", 2 ** 30, "adaptive", fail="plane:3")
    assert r["bandwidth_kept"] == pytest.approx(7 / 8, abs=0.04)
    link = simulate(make_network("mpft", 128, radix=16), "all-to-all", 2 ** 30, "adaptive", fail="link")
    assert 0.9 < link["bandwidth_kept"] <= 1.0
    spine = simulate(make_network("ft2", 32, radix=8), "all-to-all", 2 ** 30, "adaptive", fail="switch")
    assert 0.5 < spine["bandwidth_kept"] < 1.0


def test_node_limited_routing_lowers_inter_node_dispatch_bytes():
    net = make_network("mpft", 64)
    kw = dict(n_experts=256, top_k=8, hidden=7168, tokens_per_gpu=4096, samples=32)
    limited = moe_traffic(net, max_nodes=2, **kw)[1]["inter_node_bytes_per_gpu"]
    free = moe_traffic(net, max_nodes=8, **kw)[1]["inter_node_bytes_per_gpu"]
    assert limited < 0.75 * free


# ---- CLI and bad input -----------------------------------------------------------------------------
def test_cli_json_keys(capsys):
    argv = ["plan", "network", "--topology", "mpft", "--gpus", "16", "--fail", "plane:0", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    r = json.loads(out)
    assert {"bus_bandwidth_gbps", "algorithm_bandwidth_gbps", "time_us", "max_link_utilization",
            "bandwidth_kept"} <= set(r)


def test_cli_plot(tmp_path, capsys):
    target = tmp_path / "net.png"
    assert main(["plan", "network", "--topology", "ft2", "--gpus", "16", "--gpus-per-node", "2", "--radix", "8",
                 "--seeds", "1", "--plot", str(target)]) == 0
    assert target.stat().st_size > 1000


@pytest.mark.parametrize("argv, words", [
    (["--gpus", "0"], "--gpus = 0"),
    (["--gpus", "12"], "--gpus = 12"),
    (["--gpus", "64", "--topology", "ft2", "--radix", "6"], "--radix = 6"),
    (["--gpus", "64", "--radix", "7"], "--radix = 7"),
    (["--gpus", "16", "--link", "token-ring"], "--link = 'token-ring'"),
    (["--gpus", "16", "--topology", "ft2", "--fail", "plane:1"], "--fail plane:1"),
    (["--gpus", "16", "--fail", "plane:9"], "--fail plane:9"),
    (["--gpus", "16", "--collective", "all-gather", "--tp", "3"], "--tp = 3"),
    (["--gpus", "16", "--message-bytes", "lots"], "--message-bytes = 'lots'"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, words):
    assert main(["plan", "network", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err and "Traceback" not in err


def test_ft3_builds_and_crosses_pods():
    net = make_network("ft3", 64, radix=8)  # 4 NICs per leaf, 4 leaves per pod -> 4 pods
    assert max(net.level.values()) == 3
    r = simulate(net, "all-to-all", 2 ** 28, "adaptive")
    assert 40 < r["bus_bandwidth_gbps"] < 70


def test_flowset_rejects_nothing_silently():
    with pytest.raises(ValueError):
        max_min_rates(np.ones(1), FlowSet(np.array([], int), np.array([], int), np.array([]), np.ones(1)))
    with pytest.raises(ConfigError):
        make_network("torus", 16)


def test_tree_pays_fewer_latencies_than_ring_at_small_messages():
    net = make_network("ft2", 16, radix=8, gpus_per_node=2)
    ring, tree = (sweep(net, "all-gather", [64.0, 2.0 ** 30], "adaptive", algorithm=a) for a in ("ring", "tree"))
    assert tree[0]["latency_us"] < 0.5 * ring[0]["latency_us"]  # log2 16 = 4 steps vs 15
    assert tree[1]["bus_bandwidth_gbps"] == pytest.approx(ring[1]["bus_bandwidth_gbps"], rel=0.25)
