"""`moeco plan ...`: the planner's command line. Each subcommand prints a rich table, or with
`--json` exactly one JSON object on stdout; `--plot FILE.png` writes a figure where one helps.

    moeco plan model MODEL        params, KV bytes, FLOPs per token, breakdown by part
    moeco plan paper              the paper's tables beside moeco's numbers
    moeco plan ep-limit [MODEL]   communication-bound time per output token of EP decode
    moeco plan ep-step            one EP step from measured compute, bytes, bandwidths and overlap
    moeco plan topology NAME      endpoints, switches, links, cost of a network
    moeco plan network            a collective on a network: bandwidth, time, routing, failures
    moeco plan routing MODEL      node-limited routing: nodes per token, inter-node bytes, time
    moeco plan fit MODEL          per-GPU memory for training or serving on a cluster, verdict
    moeco plan local MODEL        single-request decode bound on one device (+ hybrid GPU/CPU)
    moeco plan hardware           the hardware catalog
    moeco plan eplb TRACE         expert-parallel load balancing of a recorded load trace
    moeco plan serve MODEL        disaggregated serving: prefill / decode throughput per GPU, P:D ratio
"""

from __future__ import annotations

import json
from pathlib import Path

from moeco.errors import ConfigError
from moeco.plan import arch as arch_mod
from moeco.plan import costs, hardware, memory, paper, routing, serving, speed, topology
from moeco.plan.render import _b, _emit, _g, _pyplot, _save, _table


def register(subparsers) -> None:
    plan = subparsers.add_parser("plan", help="what a cluster or a device can train and serve, and how fast",
                                 description=__doc__.split("\n\n")[0])
    sub = plan.add_subparsers(dest="plan_command", required=True, metavar="PLAN_COMMAND")

    def add(name: str, func, help_: str, model: str | None = "required", plot: bool = False, hw: bool = False):
        p = sub.add_parser(name, help=help_, description=help_)
        if model == "required":
            p.add_argument("model", metavar="MODEL", help=f"preset ({', '.join(arch_mod.preset_names())}) "
                                                          "or a config.json / its directory")
        elif model == "optional":
            p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                           help="preset or config.json (default: the paper's 7000 hidden, 61 layers)")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        if plot:
            p.add_argument("--plot", metavar="FILE.png", default=None, help="also write a figure")
        if hw:
            p.add_argument("--hardware", metavar="FILE.toml", default=None, help="extra/overriding hardware entries")
        p.set_defaults(func=func)
        return p

    p = add("model", _cmd_model, "parameters, KV-cache bytes and FLOPs per token", plot=True)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--kv-dtype", choices=sorted(costs.KV_BYTES), default="bf16")

    add("paper", _cmd_paper, "the ISCA '25 paper's tables beside moeco's numbers", model=None)

    p = add("ep-limit", _cmd_ep_limit, "communication-bound time per output token of expert-parallel decode",
            model="optional", hw=True)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--bandwidth", type=float, default=None, metavar="GBPS", help="GB/s per GPU per direction")
    p.add_argument("--link", default="ib-400g", help="catalog link when --bandwidth is not given")
    p.add_argument("--tokens-per-device", type=int, default=32)
    p.add_argument("--experts-per-token", type=int, default=None, help="routed + shared (default 9 / from MODEL)")
    p.add_argument("--dispatch-bytes", type=float, default=1)
    p.add_argument("--combine-bytes", type=float, default=2)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--compute-us", type=float, default=None,
                   help="compute per layer and micro-batch (default: assumed hidden under the transfer)")
    p.add_argument("--overlap", type=float, default=1.0, help="share of the transfer hidden, 0..1 (default 1)")

    p = add("ep-step", _cmd_ep_step, "one expert-parallel step from measured compute, bytes, link bandwidths "
                                     "and overlap fraction", model=None)
    p.add_argument("--compute-ms", type=float, required=True, help="compute per step (all that is not comm)")
    p.add_argument("--intra-bytes", type=float, default=0, help="bytes this rank sends inside its node per step")
    p.add_argument("--inter-bytes", type=float, default=0, help="bytes this rank sends to other nodes per step")
    p.add_argument("--intra-gbs", type=float, default=None, metavar="GBPS", help="measured intra-node GB/s")
    p.add_argument("--inter-gbs", type=float, default=None, metavar="GBPS", help="measured inter-node GB/s")
    p.add_argument("--overlap", type=float, default=0.0, help="share of the communication hidden, 0..1")
    p.add_argument("--links", choices=speed.LINKS, default="serial",
                   help="serial: comm = sum over the links; concurrent: their max")

    p = add("topology", _cmd_topology, "endpoints, switches, links and cost of a network", model=None, plot=True)
    p.add_argument("name", choices=[*topology.TOPOLOGIES, "all"])
    p.add_argument("--radix", type=int, default=64)
    p.add_argument("--planes", type=int, default=8)
    p.add_argument("--q", type=int, default=None, help="Slim Fly MMS parameter (default: largest that fits)")
    p.add_argument("--groups", type=int, default=None, help="dragonfly groups (default a*h - 1)")
    p.add_argument("--switch-cost", type=float, default=topology.SWITCH_COST_USD)
    p.add_argument("--link-cost", type=float, default=topology.LINK_COST_USD)
    p.add_argument("--endpoint-cost", type=float, default=topology.ENDPOINT_COST_USD,
                   help="NIC + endpoint cable per endpoint (Table 3 leaves it out)")

    p = add("routing", _cmd_routing, "node-limited routing: nodes per token, inter-node bytes, time", plot=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--max-nodes", type=int, default=None, help="M (default: topk_group or 4)")
    p.add_argument("--intra-bw", type=float, default=160, metavar="GBPS", help="NVLink GB/s (H800: 160 achievable)")
    p.add_argument("--inter-bw", type=float, default=50, metavar="GBPS", help="IB GB/s per GPU (400G: 50)")
    p.add_argument("--tokens-per-gpu", type=int, default=4096)
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)

    p = add("fit", _cmd_fit, "per-GPU memory for training or serving on a cluster, and a verdict", hw=True)
    p.add_argument("--cluster", required=True, metavar="NODESxGPUS[xGPU]", help="e.g. 4x8xH800")
    p.add_argument("--mode", choices=("train", "serve"), default="train")
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16")
    p.add_argument("--context", type=int, default=4096, help="sequence length (train) / context per request")
    p.add_argument("--kv-dtype", choices=sorted(costs.KV_BYTES), default="bf16")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (train)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel degree of non-expert weights (serve)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel degree (default: as wide as possible)")
    p.add_argument("--with-mtp", action="store_true", help="serve: also load the MTP module (speculative decoding)")

    p = add("local", _cmd_local, "single-request decode bound on one device, and the hybrid GPU/CPU split", hw=True)
    p.add_argument("--device", required=True, help="memory system holding the weights (e.g. Ryzen-AI-Max-395)")
    p.add_argument("--gpu", default=None, help="hybrid: attention + shared experts on this GPU, routed in --device")
    p.add_argument("--weight-bits", type=float, default=4)
    p.add_argument("--kv-dtype", choices=sorted(costs.KV_BYTES), default="bf16")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--efficiency", type=float, default=0.8, help="achieved fraction of peak bandwidth")

    p = add("serve", _cmd_serve, "disaggregated serving: prefill and decode throughput per GPU, P:D ratio", hw=True)
    p.add_argument("--gpu", default="H200", help="catalog device (default H200)")
    p.add_argument("--rate", type=float, required=True, help="target load, requests/s")
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--ttft-ms", type=float, default=None, help="TTFT SLO")
    p.add_argument("--tpot-ms", type=float, default=None, help="TPOT SLO (bounds the decode batch)")
    p.add_argument("--precision", choices=sorted(serving.WEIGHT_BYTES), default="fp8")
    p.add_argument("--kv-dtype", choices=sorted(costs.KV_BYTES), default="bf16")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of peak FLOP/s prefill reaches")
    p.add_argument("--bw-efficiency", type=float, default=0.8, help="fraction of peak bandwidth decode reaches")
    p.add_argument("--handover-gbs", type=float, default=50.0,
                   help="GB/s of the prefill-to-decode hand-over (default 50: one 400 Gb/s NIC)")

    add("hardware", _cmd_hardware, "the hardware catalog (devices and links)", model=None, hw=True)

    from moeco.plan.network import cli as network_cli

    network_cli.register(sub)

    p = add("eplb", _cmd_eplb, "max/mean expert load per GPU before and after EPLB's placement of a recorded trace",
            model=None)
    p.add_argument("trace", metavar="TRACE", help="run directory or metrics.jsonl of `moeco train`, or a .json/.pt "
                                                  "of per-layer expert loads")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--replicas", type=int, default=None,
                   help="physical experts per layer, a multiple of the GPUs (default: experts + one per GPU)")
    p.add_argument("--groups", type=int, default=None,
                   help="routing groups (default: n_group of the run's model/config.json, else 1)")
    p.add_argument("--policy", choices=("auto", "hierarchical", "global"), default="auto",
                   help="auto: hierarchical when nodes divide the groups, else global")
    p.add_argument("--last-steps", type=int, default=None, help="plan from the last N steps of metrics.jsonl")
    p.add_argument("--holdout", type=int, default=0, metavar="N",
                   help="plan from the steps before the last N, report on the last N (metrics.jsonl only)")


# ---- subcommands --------------------------------------------------------------------------
def _cmd_model(args) -> int:
    if args.seq_len < 1:
        raise ConfigError(f"--seq-len = {args.seq_len} is invalid: must be >= 1")
    s = costs.model_summary(args.model, args.seq_len, args.kv_dtype)
    head = _table(f"{s['model']} ({s['family']}, {s['attention'].upper()})", ["quantity", "value"], [
        ["params total", _b(s["params_total"])],
        ["params active / token", _b(s["params_active"])],
        ["params MTP (separate)", _b(s["params_mtp"])],
        [f"KV cache / token ({s['kv_dtype']})", f"{s['kv_cache_bytes_per_token']:,} B"],
        [f"train GFLOP / token (s={s['seq_len']}, causal)", _g(s["train_flops_per_token"])],
        ["forward GFLOP / token", _g(s["forward_flops_per_token"])],
    ])
    parts = _table("breakdown per token", ["part", "active params", "forward GFLOP", "train GFLOP"], [
        [k, _b(v["params_active"]), _g(v["forward_flops"]), _g(v["train_flops"])] for k, v in s["breakdown"].items()
    ], caption="embedding is a lookup (0 FLOPs); head counted as a matmul; MTP excluded")
    if getattr(args, "plot", None):
        _plot_kv(args, s["model"])
    return _emit(args, s, head, parts)


def _plot_kv(args, model: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ctx = [2 ** i for i in range(10, 18)]
    names = dict.fromkeys([args.model, "deepseek-v3", "qwen2.5-72b", "llama-3.1-405b"])
    for name in names:
        per = costs.kv_bytes_per_token(name, args.kv_dtype)
        label = model if name == args.model else name
        ax.plot(ctx, [per * c / 1e9 for c in ctx], marker="o", label=f"{label} ({per:,} B/token)")
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="KV cache per sequence (GB)",
           title=f"KV cache vs context ({args.kv_dtype})")
    ax.legend(fontsize=8)
    _save(fig, args.plot, args)


def _cmd_paper(args) -> int:
    rows = paper.reproduction_rows()
    out = paper.summary(rows)

    def fmt(v):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if isinstance(v, float) else str(v)

    table = _table("DeepSeek-V3 ISCA '25 / TR figures vs moeco", ["table", "quantity", "paper", "moeco", "status",
                                                                    "note"],
                   [[r["table"], r["quantity"], fmt(r["paper"]), fmt(r["moeco"]), r["status"], r["note"]]
                    for r in rows], left=2,
                   caption=f"{out['reproduced']} reproduced, {out['differs']} differ (reasons in the note column)")
    return _emit(args, out, table)


def _cmd_ep_limit(args) -> int:
    catalog = hardware.load_catalog(args.hardware)
    hidden, layers, experts = 7000, 61, 9  # the paper's "7K", 61 layers, 8 routed + 1 shared
    if args.model:
        a = arch_mod.load_arch(args.model)
        if not a.is_moe:
            raise ConfigError(f"ep-limit models expert-parallel decode; {a.name} has no routed experts")
        hidden, layers = a.hidden_size, a.num_hidden_layers
        shared = round(a.shared_intermediate_size / a.moe_intermediate_size) if a.shared_intermediate_size else 0
        experts = a.num_experts_per_tok + shared
    hidden = hidden if args.hidden is None else args.hidden
    layers = layers if args.layers is None else args.layers
    experts = experts if args.experts_per_token is None else args.experts_per_token
    link = None if args.bandwidth is not None else hardware.get_link(args.link, catalog)
    bw = link.bandwidth_gbs if link else args.bandwidth
    r = speed.ep_comm_limit(hidden, layers, bw, args.tokens_per_device, experts, args.dispatch_bytes,
                            args.combine_bytes, args.micro_batches, args.compute_us, args.overlap)
    r["link"] = link.name if link else None
    rows = [["bytes per dispatch+combine", f"{r['bytes_per_step']:,.0f} B"],
            ["transfer per step", f"{r['transfer_us']:.2f} us"]]
    if args.compute_us is not None:
        rows.append([f"per micro-batch ({args.compute_us:g} us compute, overlap {args.overlap:g})",
                     f"{r['micro_batch_us']:.2f} us"])
    rows += [[f"per layer (x{r['micro_batches']} micro-batches)", f"{r['layer_us']:.2f} us"],
             [f"TPOT ({layers} layers)", f"{r['tpot_ms']:.2f} ms"],
             ["tokens/s per request", f"{r['tokens_per_s']:,.2f}"]]
    hidden_note = ("compute hidden" if args.compute_us is None else
                   f"{args.overlap:g} of the transfer hidden, at most the compute")
    t = _table(f"EP decode communication limit ({r['link'] or f'{bw:g} GB/s'})", ["quantity", "value"], rows,
               caption=f"hidden {hidden}, {args.tokens_per_device} tokens/device, {experts} experts/token, "
                       f"{args.dispatch_bytes:g} B dispatch + {args.combine_bytes:g} B combine, {bw:g} GB/s; "
                       f"{hidden_note}, latency ignored")
    return _emit(args, r, t)


def _cmd_ep_step(args) -> int:
    r = speed.ep_step(args.compute_ms, args.intra_bytes, args.inter_bytes, args.intra_gbs, args.inter_gbs,
                      args.overlap, args.links)

    def link(name):
        nbytes, bw, ms = r[f"{name}_bytes"], r[f"{name}_gbs"], r[f"{name}_ms"]
        return f"{nbytes / 1e6:,.3f} MB" + (f" at {bw:g} GB/s = {ms:.3f} ms" if nbytes else "")

    t = _table(f"EP step, overlap {r['overlap']:g}", ["quantity", "value"], [
        ["compute", f"{r['compute_ms']:.3f} ms"],
        ["intra-node", link("intra")],
        ["inter-node", link("inter")],
        [f"communication ({r['links']})", f"{r['comm_ms']:.3f} ms"],
        ["hidden under compute", f"{r['hidden_ms']:.3f} ms"],
        ["step", f"{r['step_ms']:.3f} ms"],
        ["step, no overlap / full overlap", f"{r['step_ms_no_overlap']:.3f} / {r['step_ms_full_overlap']:.3f} ms"],
    ], caption=f"step = compute + comm - min(overlap x comm, compute); {r['bound']}-bound at full overlap; "
               "latency inside the measured bandwidths")
    return _emit(args, r, t)


def _cmd_topology(args) -> int:
    names = topology.TOPOLOGIES if args.name == "all" else (args.name,)
    results = []
    for name in names:
        t = topology.build(name, args.radix, args.planes, args.q, args.groups)
        results.append(t.cost(args.switch_cost, args.link_cost, args.endpoint_cost))
    t = _table(f"network topologies, radix {args.radix}", ["topology", "endpoints", "switches", "links",
                                                           "cost M$", "cost/endpoint k$"], [
        [r["name"], f"{r['endpoints']:,}", f"{r['switches']:,}", f"{r['links']:,}", f"{r['cost_usd'] / 1e6:,.1f}",
         f"{r['cost_per_endpoint_usd'] / 1e3:,.2f}"] for r in results
    ], caption=f"switch ${args.switch_cost:,.0f}, link ${args.link_cost:,.0f}, endpoint ${args.endpoint_cost:,.0f} "
               "(assumed prices, fitted to ISCA Table 3; override with --switch-cost/--link-cost/--endpoint-cost)")
    if args.plot:
        everything = [topology.build(n, args.radix, args.planes, args.q, args.groups)
                      .cost(args.switch_cost, args.link_cost, args.endpoint_cost) for n in topology.TOPOLOGIES]
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar([r["name"] for r in everything], [r["cost_per_endpoint_usd"] / 1e3 for r in everything],
               color=["C1" if r["name"] in names else "C0" for r in everything])
        ax.set(ylabel="cost per endpoint (k$)", title=f"network cost per endpoint, radix {args.radix}")
        _save(fig, args.plot, args)
    obj = results[0] if len(results) == 1 else {"topologies": results}
    return _emit(args, obj, t)


def _cmd_routing(args) -> int:
    r = routing.routing_plan(args.model, args.nodes, args.gpus_per_node, args.max_nodes, args.intra_bw,
                             args.inter_bw, args.tokens_per_gpu, samples=args.samples, seed=args.seed)
    t = _table(f"{r['model']}: top-{r['experts_per_token']} of {r['routed_experts']} experts on "
               f"{r['nodes']} nodes x {r['gpus_per_node']} GPUs",
               ["M (max nodes)", "distinct nodes", "remote nodes", "IB KB/token", "naive IB KB/token",
                "NVLink KB/token", f"time us ({r['tokens_per_gpu']} tok/GPU)", "bound by"], [
        [("* " if s["max_nodes"] == r["max_nodes"] else "") + str(s["max_nodes"])
         + (" (no limit)" if s["max_nodes"] == r["nodes"] else ""),
         f"{s['distinct_nodes']:.2f}", f"{s['remote_nodes']:.2f}", f"{s['inter_node_bytes_per_token'] / 1e3:.1f}",
         f"{s['naive_inter_node_bytes_per_token'] / 1e3:.1f}", f"{s['nvlink_bytes_per_token'] / 1e3:.1f}",
         f"{s['time_us']:,.0f}", s["bottleneck"]] for s in r["sweep"]
    ], caption=(f"dispatch+combine per token, {r['bytes_per_copy']:,.0f} B per copy; NVLink {r['intra_bw_gbs']:g} "
                f"GB/s is {r['nvlink_to_ib_ratio']:.1f}x IB {r['inter_bw_gbs']:g} GB/s, so a token can reach "
                f"~{r['experts_per_node_free']:.1f} experts per node for one IB copy: up to "
                f"{r['max_experts_same_ib_cost']:.1f} experts on M = {r['max_nodes']} nodes at the same IB cost. "
                f"Sampled ({r['samples']} tokens, seed {r['seed']}); naive = no NVLink forwarding."))
    if args.plot:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4))
        ms = [s["max_nodes"] for s in r["sweep"]]
        ax.plot(ms, [s["inter_node_bytes_per_token"] / 1e3 for s in r["sweep"]], marker="o", label="IB, forwarded")
        ax.plot(ms, [s["naive_inter_node_bytes_per_token"] / 1e3 for s in r["sweep"]], marker="s", label="IB, naive")
        ax.plot(ms, [s["nvlink_bytes_per_token"] / 1e3 / r["nvlink_to_ib_ratio"] for s in r["sweep"]],
                linestyle="--", label="NVLink / (NVLink:IB ratio)")
        ax.set(xlabel="M (max nodes per token)", ylabel="KB per token (dispatch + combine)",
               title=f"{r['model']}: node-limited routing on {r['nodes']} nodes")
        ax.legend(fontsize=8)
        _save(fig, args.plot, args)
    return _emit(args, r, t)


def _cmd_fit(args) -> int:
    catalog = hardware.load_catalog(args.hardware)
    nodes, gpus, device = hardware.parse_cluster(args.cluster, catalog)
    if args.mode == "train":
        r = memory.fit_train(args.model, nodes, gpus, device, args.precision, args.context, args.pp, args.ep)
        extra = [["pipeline stages x data parallel", f"{r['pp']} x {r['dp']}"]]
    else:
        r = memory.fit_serve(args.model, nodes, gpus, device, args.precision, args.context, args.kv_dtype,
                             args.tp, args.ep, with_mtp=args.with_mtp)
        extra = [["KV capacity per GPU", f"{r['kv_tokens_per_gpu']:,} tokens ({r['kv_capacity_gb']:.1f} GB)"],
                 ["KV tokens, whole cluster", f"{r['kv_tokens_total']:,}"],
                 [f"concurrent sequences at {r['context']:,}", f"{r['concurrent_sequences']:,}"]]
    verdict = (f"fits, {r['margin_gb']:.1f} GB to spare per GPU" if r["fits"]
               else f"does NOT fit: {-r['margin_gb']:.1f} GB over per GPU")
    min_ep = r["min_ep_that_fits"]
    knob, best = ("pp", r["min_pp_that_fits"]) if args.mode == "train" else ("tp", r["min_tp_that_fits"])
    rows = [[f"{k} (GB/GPU)", f"{v:.2f}"] for k, v in r["per_gpu_gb"].items()]
    rows += [["used / memory (GB)", f"{r['used_gb']:.2f} / {r['memory_gb']:g}"], *extra,
             ["expert-parallel degree", str(r["ep"])],
             ["smallest EP degree that fits", str(min_ep) if min_ep else "none at this layout"],
             [f"smallest --{knob} that fits (widest EP)", str(best) if best else
              "none: more GPUs" + (" or --precision fp8" if args.precision == "bf16" else "")],
             ["verdict", verdict]]
    r["verdict"] = verdict
    t = _table(f"{r['model']} {args.mode} on {r['cluster']} ({args.precision})", ["quantity", "value"], rows,
               caption="estimates: see moeco/plan/memory.py for every term")
    return _emit(args, r, t)


def _cmd_local(args) -> int:
    catalog = hardware.load_catalog(args.hardware)
    device = hardware.get_device(args.device, catalog)
    gpu = hardware.get_device(args.gpu, catalog) if args.gpu else None
    r = speed.local_decode(args.model, device, args.weight_bits, args.kv_dtype, args.context, args.efficiency, gpu)
    rows = [["active params read / token", _b(r["params_active_read"])],
            [f"bytes / token ({args.weight_bits:g}-bit weights + KV at {args.context:,})",
             f"{r['bytes_per_token'] / 1e9:.2f} GB"],
            [f"upper bound ({device.bandwidth_gbs:g} GB/s)", f"{r['tokens_per_s_bound']:.1f} tokens/s"],
            [f"expected (x{args.efficiency:g} of peak bandwidth)", f"{r['tokens_per_s']:.1f} tokens/s"],
            ["memory needed / available", f"{r['memory_needed_gb']:.1f} / {device.memory_gb:g} GB"
             + ("" if r["fits"] else "  (does NOT fit)")]]
    h = r["hybrid"]
    if h:
        rows += [[f"hybrid: {h['gpu']} reads / token", f"{h['gpu_bytes_per_token'] / 1e9:.2f} GB "
                                                       f"({h['gpu_ms_per_token']:.1f} ms)"],
                 [f"hybrid: {h['host']} reads routed experts", f"{h['host_bytes_per_token'] / 1e9:.2f} GB "
                                                               f"({h['host_ms_per_token']:.1f} ms)"],
                 ["hybrid memory GPU / host", f"{h['gpu_memory_needed_gb']:.1f} / {h['gpu_memory_gb']:g} GB, "
                                              f"{h['host_memory_needed_gb']:.1f} / {h['host_memory_gb']:g} GB"
                  + ("" if h["fits"] else "  (does NOT fit)")],
                 ["hybrid bound / expected", f"{h['tokens_per_s_bound']:.1f} / {h['tokens_per_s']:.1f} tokens/s"]]
    t = _table(f"{r['model']} single-request decode on {device.name}", ["quantity", "value"], rows,
               caption="memory-bandwidth bound: every active weight and the KV cache read once per token")
    return _emit(args, r, t)


def _cmd_serve(args) -> int:
    device = hardware.get_device(args.gpu, hardware.load_catalog(args.hardware))
    r = serving.plan_serve(args.model, device, args.rate, args.input_len, args.output_len, args.ttft_ms, args.tpot_ms,
                           args.precision, args.kv_dtype, args.mfu, args.bw_efficiency,
                           handover_gbs=args.handover_gbs)
    slo = lambda ok: "" if ok is None else ("  (meets the SLO)" if ok else "  (MISSES the SLO)")
    rows = [["GPUs per worker (weights fit)", str(r["gpus_per_worker"])],
            ["prefill tokens/s per GPU", f"{r['prefill_tokens_per_s_per_gpu']:,.0f}"],
            ["TTFT without queueing", f"{r['ttft_ms_no_queue']:,.1f} ms" + slo(r["ttft_slo_met"])],
            ["decode batch per worker (fits: %d)" % r["decode_batch_fit"], str(r["decode_batch"])],
            ["decode step (TPOT)", f"{r['decode_step_ms']:.2f} ms" + slo(r["tpot_slo_met"])],
            ["decode tokens/s per GPU", f"{r['decode_tokens_per_s_per_gpu']:,.0f}"],
            [f"workers for {args.rate:g} req/s", f"{r['prefill_workers']} prefill + {r['decode_workers']} decode"],
            ["prefill:decode workers", r["ratio"]],
            ["decode GPUs per prefill GPU (any load)", f"{r['decode_per_prefill_gpu']:.2f}"],
            ["hand-over per request", _b(r["handover_bytes_per_request"]) + "B, "
                                      f"{r['handover_ms_per_request']:.2f} ms at {args.handover_gbs:g} GB/s"]]
    t = _table(f"{r['model']} disaggregated on {device.name} ({args.precision}, {args.input_len} in / "
               f"{args.output_len} out)", ["quantity", "value"], rows,
               caption="estimates: see moeco/plan/serving.py for every term")
    return _emit(args, r, t)


def _cmd_hardware(args) -> int:
    catalog = hardware.load_catalog(args.hardware)
    devs = catalog["devices"].values()
    links = catalog["links"].values()
    out = {"devices": [vars(d) for d in devs], "links": [vars(x) for x in links]}
    t1 = _table("devices", ["name", "kind", "memory GB", "GB/s", "BF16 TFLOPS", "FP8 TFLOPS", "source"], [
        [d.name, d.kind, f"{d.memory_gb:g}", f"{d.bandwidth_gbs:g}", f"{d.bf16_tflops:g}",
         "-" if d.fp8_tflops is None else f"{d.fp8_tflops:g}", d.source] for d in devs])
    t2 = _table("links (per GPU, per direction)", ["name", "GB/s", "achievable", "latency us", "source"], [
        [x.name, f"{x.bandwidth_gbs:g}", "-" if x.achievable_gbs is None else f"{x.achievable_gbs:g}",
         "-" if x.latency_us is None else f"{x.latency_us:g}", x.source] for x in links])
    return _emit(args, out, t1, t2)


def _cmd_eplb(args) -> int:
    from moeco.parallel import eplb

    for flag in ("nodes", "gpus_per_node", "replicas", "groups", "last_steps", "holdout"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "holdout" else 1):
            raise ConfigError(f"--{flag.replace('_', '-')} = {value} is invalid: must be >= "
                              f"{0 if flag == 'holdout' else 1}")
    layer_ids, load_LE = eplb.read_loads(args.trace, args.last_steps, skip_last=args.holdout)
    gpus = args.nodes * args.gpus_per_node
    replicas = args.replicas if args.replicas is not None else load_LE.shape[1] + gpus
    groups = args.groups if args.groups is not None else _trace_groups(Path(args.trace))
    placement = eplb.Placement.plan(load_LE, replicas, groups, args.nodes, gpus, layer_ids, args.policy)
    held_ids, held_LE = eplb.read_loads(args.trace, args.holdout) if args.holdout else (layer_ids, load_LE)
    if held_ids != layer_ids:
        raise ConfigError(f"the held-out steps have layers {held_ids}, the planned ones {layer_ids}: "
                          "record the trace with one model")
    r = eplb.report(held_LE, placement)
    r.update(trace=str(args.trace), groups=groups, holdout_steps=args.holdout)

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    t = _table(f"EPLB: {r['experts']} experts -> {replicas} replicas on {args.nodes} nodes x {args.gpus_per_node} GPUs "
               f"({r['policy']} policy, {groups} groups)", ["layer", "tokens", "max/mean before", "max/mean after",
                                                            "max replicas"],
               [[x["layer"], f"{x['tokens']:,.0f}", f(x["before"]), f(x["after"]), x["max_replicas"]]
                for x in r["layers"]] + [["all", f"{sum(x['tokens'] for x in r['layers']):,.0f}", f(r["before"]),
                                          f(r["after"]), ""]],
               caption=(f"planned from all but the last {args.holdout} steps, loads of those {args.holdout} shown; "
                        if args.holdout else "")
                       + "load per GPU = tokens of the experts it holds, each expert's split evenly over its replicas; "
                       "before = expert e on GPU e // (experts / GPUs), no replicas; all = sum of layer maxima / "
                       "sum of layer means")
    return _emit(args, r, t)


def _trace_groups(trace: Path) -> int:
    """n_group of the run that recorded the trace (RUN/model/config.json, or RUN/train_config.toml
    while it trains), else 1."""
    run = trace if trace.is_dir() else trace.parent
    try:
        return int(json.loads((run / "model" / "config.json").read_text()).get("n_group") or 1)
    except (OSError, ValueError, TypeError):
        pass
    try:
        from moeco.train.config import TrainConfig

        return TrainConfig.from_toml(run / "train_config.toml").model_config().n_group
    except Exception:  # no run around the trace: plan without groups
        return 1
