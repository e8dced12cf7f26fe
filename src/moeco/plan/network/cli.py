"""`moeco plan network`: one collective on one network, or `--paper` (the paper's figures vs the model)."""

from __future__ import annotations

import re

from moeco.errors import ConfigError
from moeco.plan.network.collectives import ALGORITHMS, COLLECTIVES
from moeco.plan.network.graph import NETWORK_TOPOLOGIES
from moeco.plan.network.paths import ROUTING_MODES

HELP = "a collective on a fat-tree, multi-plane or multi-rail network: bandwidth, time, failures (flow-level)"
PLOT_TOPOLOGIES = ("ft2", "mpft", "mrft")


def parse_bytes(text: str) -> float:
    """'256M', '1GiB', '4096', '64B' -> bytes (K, M, G, T are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"--message-bytes = {text!r} is invalid: write a size such as 4096, 256M or 1G")
    return float(m[1]) * 1024 ** " kmgt".index(m[2] or " ")


def register(sub) -> None:
    p = sub.add_parser("network", help=HELP, description=HELP)
    p.add_argument("--paper", action="store_true", help="the paper's network figures beside the model (~1 min)")
    p.add_argument("--topology", choices=NETWORK_TOPOLOGIES, default="mpft")
    p.add_argument("--gpus", type=int, default=None, help="total GPUs (required unless --paper)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--link", default="ib", help="scale-out link: ib or roce (400G), or a catalog link")
    p.add_argument("--device", default="H800", help="GPU, for its NVLink (catalog name)")
    p.add_argument("--radix", type=int, default=64, help="switch ports")
    p.add_argument("--routing", choices=ROUTING_MODES, default="adaptive")
    p.add_argument("--collective", choices=COLLECTIVES, default="all-to-all")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="ring", help="all-gather / reduce-scatter")
    p.add_argument("--message-bytes", default="256M", help="NCCL's size per rank (K/M/G = 1024^n)")
    p.add_argument("--tp", type=int, default=None, help="groups of K GPUs on K nodes instead of all GPUs")
    p.add_argument("--fail", default=None, metavar="link|switch|plane:K")
    p.add_argument("--channels", type=int, default=2, help="connections per peer that ECMP hashes apart")
    p.add_argument("--seeds", type=int, default=4, help="ECMP hash seeds averaged")
    p.add_argument("--no-pxn", action="store_true", help="mrft: cross-rail traffic over the spines, not NVLink")
    p.add_argument("--model", default="deepseek-v3", help="dispatch/combine: the MoE model's routing")
    p.add_argument("--tokens-per-gpu", type=int, default=4096)
    p.add_argument("--max-nodes", type=int, default=None, help="dispatch/combine: node-limited routing M")
    p.add_argument("--hardware", metavar="FILE.toml", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="bus bandwidth vs message size, ft2 / mpft / mrft x ecmp / adaptive")
    p.set_defaults(func=run)


def run(args) -> int:
    from moeco.plan import render as plan_cli
    from moeco.plan.network import paper
    from moeco.plan.network.simulate import make_network, simulate

    if args.paper:
        rows = paper.network_rows()
        out = paper.summary(rows)
        t = plan_cli._table("DeepSeek-V3 ISCA '25 network figures vs the flow-level model",
                            ["figure", "quantity", "paper", "model", "status", "note"],
                            [[r["figure"], r["quantity"], r["paper"], r["model"], r["status"], r["note"]]
                             for r in rows], left=2,
                            caption=f"{out['reproduced']} reproduced, {out['differs']} differ, {out['input']} inputs")
        return plan_cli._emit(args, out, t)
    if args.gpus is None:
        raise ConfigError("--gpus is required (e.g. --gpus 32), or use --paper")
    size = parse_bytes(args.message_bytes)
    net = make_network(args.topology, args.gpus, args.gpus_per_node, args.link, args.device, args.radix, args.hardware)
    r = simulate(net, args.collective, size, args.routing, args.tp, args.algorithm, args.channels, args.seeds,
                 not args.no_pxn, args.fail, args.model, args.tokens_per_gpu, args.max_nodes)
    rows = [["bus bandwidth per GPU", f"{r['bus_bandwidth_gbps']:.2f} GB/s"
             + (f" (seeds {r['bus_bandwidth_gbps_range'][0]:.1f}-{r['bus_bandwidth_gbps_range'][1]:.1f})"
                if r["seeds"] > 1 else "")],
            ["algorithm bandwidth", f"{r['algorithm_bandwidth_gbps']:.2f} GB/s"],
            ["time", f"{r['time_us']:,.1f} us (latency {r['latency_us']:.1f} us)"],
            ["busiest link utilization", f"{r['max_link_utilization']:.1%}"]]
    if "nic_bandwidth_gbps" in r:
        rows += [["network bytes per GPU per second", f"{r['nic_bandwidth_gbps']:.2f} GB/s"],
                 ["as DeepEP counts (own-node copies too)", f"{r['deepep_bandwidth_gbps']:.2f} GB/s"],
                 ["inter-node bytes per GPU", f"{r['inter_node_bytes_per_gpu'] / 1e6:,.1f} MB"]]
    if "bandwidth_kept" in r:
        rows += [["failed", r["failure"]],
                 ["bus bandwidth healthy", f"{r['healthy_bus_bandwidth_gbps']:.2f} GB/s"],
                 ["bandwidth kept", f"{r['bandwidth_kept']:.1%}"]]
    group = f"TP groups of {args.tp}" if args.tp else f"{r['group_size']} GPUs"
    t = plan_cli._table(f"{r['collective']} ({group}, {r['message_bytes']:,.0f} B) on {r['topology']}: "
                        f"{r['nodes']} x {r['gpus_per_node']} GPUs, {r['link']}, {r['routing']} routing",
                        ["quantity", "value"], rows,
                        caption="flow-level max-min model; bus bandwidth in NCCL's convention; "
                                "see moeco/plan/network/ for every assumption")
    if args.plot:
        _plot(args, size)
    return plan_cli._emit(args, r, t)


def _plot(args, size: float) -> None:
    from moeco.plan import render as plan_cli
    from moeco.plan.network.simulate import make_network, sweep

    if args.collective in ("dispatch", "combine"):
        raise ConfigError("--plot sweeps message sizes; use it with all-to-all, all-gather or reduce-scatter")
    sizes = [2.0 ** e for e in range(10, 35, 2)]  # 1 KiB .. 16 GiB
    plt = plan_cli._pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, topo in enumerate(PLOT_TOPOLOGIES):
        net = make_network(topo, args.gpus, args.gpus_per_node, args.link, args.device, args.radix, args.hardware)
        for mode, style in (("adaptive", "-"), ("ecmp", "--")):
            pts = sweep(net, args.collective, sizes, mode, args.tp, args.algorithm, args.channels, args.seeds,
                        not args.no_pxn)
            ax.plot(sizes, [p["bus_bandwidth_gbps"] for p in pts], style, color=f"C{i}", marker="o", markersize=3,
                    label=f"{topo} {mode}")
    ax.set(xscale="log", xlabel="message size per rank (bytes)", ylabel="bus bandwidth per GPU (GB/s)",
           title=f"{args.collective}, {args.gpus} GPUs ({args.gpus_per_node}/node), {args.link}, radix {args.radix}"
                 + (f", TP {args.tp}" if args.tp else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    plan_cli._save(fig, args.plot, args)
