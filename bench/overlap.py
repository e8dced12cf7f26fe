"""Step time with and without the dual micro-batch overlap, 4 gloo ranks on CPU (2 nodes x 2), against
the planner's EP step model.

    PYTHONPATH=src python bench/overlap.py                       # figures + docs/img/overlap_timeline.png
    PYTHONPATH=src python bench/overlap.py --steps 5 --seqs 4 --seq-len 64 --json out.json

Each rank holds `--seqs` sequences and E/4 routed experts (`--dispatcher`, default direct; fp32); a step
is forward + backward of the LM loss. Three schedules, alternated `--rounds` times (drift of a loaded
machine shows), all through the timed stages of moeco.parallel.overlap: `none` runs the whole batch as
one micro-batch, each all-to-all waited on as soon as it is issued (only a dispatch has its own shared
experts under it); `two_microbatch` splits it in two and keeps one half's dispatch/combine in flight
while the other computes, in the forward and, mirrored, in the backward; `forward_only` is the same
forward with each gradient all-to-all sent and received at once (the backward not overlapped). Step
times are medians over `--steps` after one warm-up, max over ranks.
Rank 0's spans, forward and backward, are split into compute, comm blocked (count exchange + posting
+ waiting) and in flight behind the other micro-batch's compute (an upper bound on the hidden time),
averaged over every measured step; the last step of the round of median step time is drawn as a
timeline.

Planner model (moeco.plan.speed.ep_step), rank 0, per step, every input measured in the same run:
compute = rank 0's step time - its blocked comm time; bytes = the byte counters' forward bytes
(intra-node, inter-node) + the payload's gradients in the backward (the same bytes back); link GB/s =
`moeco.parallel.bandwidth.all_to_all_gbs` on the intra-node and the inter-node groups at the mean
payload of one dispatch all-to-all, measured after each schedule's steps; overlap f = in flight /
(in flight + blocked), forward and backward together. Printed: the predicted step at the measured f,
at f = 0 and at f = 1 (the paper's assumption), against rank 0's measured step, and the communication
the model leaves exposed against the blocked time measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.multiprocessing as mp

MODES = ("none", "forward_only", "two_microbatch")


def _config(args):
    from moeco.config import ModelConfig

    return ModelConfig(vocab_size=512, hidden_size=args.dim, intermediate_size=2 * args.dim,
                       moe_intermediate_size=args.dim // 2, num_hidden_layers=args.layers, num_attention_heads=4,
                       q_lora_rank=args.dim // 2, kv_lora_rank=args.dim // 4, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=args.experts, n_shared_experts=1,
                       num_experts_per_tok=4, first_k_dense_replace=1, n_group=4, topk_group=2,
                       max_position_embeddings=1024, initializer_range=0.05, num_nextn_predict_layers=0)


def _worker(rank, world, port, args, out):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % 2), "LOCAL_WORLD_SIZE": "2"})
    torch.set_num_threads(args.threads)
    import torch.distributed as dist
    import torch.nn.functional as F

    from moeco import Transformer
    from moeco.parallel.bandwidth import all_to_all_gbs
    from moeco.parallel.expert_parallel import apply_expert_parallel
    from moeco.parallel.mesh import Mesh, MeshSpec
    from moeco.parallel.overlap import PHASES, OverlapStats, set_overlap

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    config = _config(args)
    torch.manual_seed(0)
    model = Transformer(config)
    mesh = Mesh(MeshSpec.from_env(ep=world, gpus_per_node=2))
    counter = apply_expert_parallel(model, mesh, args.dispatcher)
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    g = torch.Generator().manual_seed(rank)
    seqs = torch.randint(0, config.vocab_size, (args.seqs, args.seq_len + 1), generator=g)
    result = {}
    for mode in MODES * args.rounds:
        sched = set_overlap(model, "two_microbatch")
        sched.micro_batches = 1 if mode == "none" else 2
        sched.overlap_backward = mode != "forward_only"
        times, sums, skew = [], {ph: OverlapStats() for ph in PHASES}, []
        for i in range(args.steps + 1):
            dist.barrier()
            counter.reset()
            t0 = time.perf_counter()
            logits = model(seqs[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), seqs[:, 1:].flatten())
            loss.backward()
            model.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
                sums = {ph: sums[ph] + sched.last.stats(ph) for ph in PHASES}
                skew.append(_arrival_skew(sched.last, world))
        t = torch.tensor([statistics.median(times)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        entry = {"step_s": t.item(), "rank_step_s": statistics.mean(times),
                 "bytes": {f"{k}_{link}": v for (k, link), v in counter.bytes.items()}}  # the last step's
        for phase in PHASES:
            entry[phase] = {k: v / args.steps for k, v in asdict(sums[phase]).items()}  # a step's mean
            entry[f"spans_{phase}"] = sched.last.spans(phase)
        blocked = sum(entry[ph]["comm_issue_s"] + entry[ph]["comm_wait_s"] for ph in PHASES)
        entry["skew_s"] = statistics.mean(skew)
        mine = torch.tensor([entry["rank_step_s"], blocked, sum(entry[ph]["in_flight_s"] for ph in PHASES),
                             entry["skew_s"]])
        every = [torch.zeros(4) for _ in range(world)]
        dist.all_gather(every, mine)
        entry["ranks"] = [x.tolist() for x in every]  # per rank: mean step, blocked, in flight, skew (s)
        hops = 2 if args.dispatcher == "two_hop" else 1
        payload = sum(v for (k, _), v in counter.bytes.items() if k == "dispatch")
        payload = int(payload / (moe_layers * sched.micro_batches * hops))
        entry["payload_bytes"] = payload
        for link, group in (("intra", mesh.intra_group), ("inter", mesh.inter_group), ("ep", mesh.ep_group)):
            entry[f"{link}_gbs"] = all_to_all_gbs(group, payload, iters=args.bw_iters)["gbs"]
        result.setdefault(mode, []).append(entry)
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def _arrival_skew(tl, world) -> float:
    """Seconds this rank waited, summed over the step's collectives, for the last rank to arrive: the
    ranks' perf_counter is one clock on one host (CLOCK_MONOTONIC), so the issue spans' starts compare."""
    import torch.distributed as dist

    mine = {(ph, mb, layer, name): t0 for ph in tl.raw for mb, layer, kind, name, t0, _ in tl.raw[ph]
            if kind == "issue"}
    every = [None] * world
    dist.all_gather_object(every, mine)
    return sum(max(e[k] for e in every) - t0 for k, t0 in mine.items())


def plot(spans_by_phase, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"attention": "#4c72b0", "route": "#8172b2", "shared": "#64b5cd", "experts": "#55a868",
              "add": "#937860", "mlp": "#4c72b0", "dispatch": "#bbbbbb", "combine": "#bbbbbb"}
    fig, axes = plt.subplots(2, 1, figsize=(11, 4.6))
    for ax, (phase, spans) in zip(axes, spans_by_phase.items()):
        t0 = min(s[4] for s in spans)
        for mb, layer, kind, name, a, b in spans:
            color = colors.get(name, "grey") if kind == "compute" else ("#c44e52" if kind == "wait" else "#dd8452")
            ax.barh(1 - mb, (b - a) * 1e3, left=(a - t0) * 1e3, color=color, height=0.6)
        issued = {}
        for mb, layer, kind, name, a, b in spans:  # in flight: issue returned -> wait started
            if kind == "issue":
                issued[(mb, layer, name)] = b
            elif kind == "wait" and (mb, layer, name) in issued:
                s = issued.pop((mb, layer, name))
                ax.plot([(s - t0) * 1e3, (a - t0) * 1e3], [1 - mb - 0.42] * 2, color="#dd8452", lw=2)
        ax.set_yticks([1, 0], ["micro-batch A", "micro-batch B"])
        ax.set_xlabel(f"ms (rank 0, one {phase}, host wall clock)")
    extra = {"comm's local work": "#bbbbbb", "comm issue (line: in flight)": "#dd8452", "comm wait": "#c44e52"}
    axes[0].legend(handles=[Patch(color=c, label=n) for n, c in [*list(colors.items())[:5], *extra.items()]],
                   ncol=8, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.3), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _median_round(entries) -> int:
    order = sorted(range(len(entries)), key=lambda i: entries[i]["step_s"])
    return order[len(order) // 2]


def _line(phase, st):
    return (f"{phase:8s} wall {st['wall_s'] * 1e3:6.1f} ms = compute {st['compute_s'] * 1e3:6.1f} + comm blocked "
            f"{(st['comm_issue_s'] + st['comm_wait_s']) * 1e3:5.1f} (issue {st['comm_issue_s'] * 1e3:5.1f}, wait "
            f"{st['comm_wait_s'] * 1e3:5.1f}); in flight behind compute {st['in_flight_s'] * 1e3:5.1f} ms")


def predict(entries) -> dict:
    """The planner's step (moeco.plan.speed.ep_step) from rank 0's measured inputs, means over rounds."""
    from moeco.plan.speed import ep_step

    mean = lambda f: statistics.mean(f(e) for e in entries)  # noqa: E731
    blocked = mean(lambda e: sum(e[ph]["comm_issue_s"] + e[ph]["comm_wait_s"] for ph in ("forward", "backward")))
    in_flight = mean(lambda e: sum(e[ph]["in_flight_s"] for ph in ("forward", "backward")))
    step = mean(lambda e: e["rank_step_s"])

    def link_bytes(e, link):  # forward bytes + the payload's gradients sent back in the backward
        b = e["bytes"]
        payload = b.get(f"dispatch_{link}", 0) + b.get(f"combine_{link}", 0)
        return 2 * payload + b.get(f"meta_{link}", 0)

    f = in_flight / (in_flight + blocked) if in_flight + blocked else 0.0
    inputs = dict(compute_ms=(step - blocked) * 1e3, intra_bytes=mean(lambda e: link_bytes(e, "intra")),
                  inter_bytes=mean(lambda e: link_bytes(e, "inter")),
                  intra_gbs=statistics.median(e["intra_gbs"] for e in entries),
                  inter_gbs=statistics.median(e["inter_gbs"] for e in entries))
    r = ep_step(**inputs, overlap=f)
    return r | {"measured_step_ms": step * 1e3, "measured_blocked_ms": blocked * 1e3,
                "skew_ms": mean(lambda e: e["skew_s"]) * 1e3,
                "ep_gbs": statistics.median(e["ep_gbs"] for e in entries),
                "in_flight_ms": in_flight * 1e3, "ratio": r["step_ms"] / (step * 1e3),
                "payload_bytes": statistics.mean(e["payload_bytes"] for e in entries)}


def _predict_lines(res, rounds, steps) -> list[str]:
    lines = [f"  planner EP step (moeco.plan.speed.ep_step) against rank 0's measured step, means of {rounds * steps} "
             "steps, ms:", f"    {'schedule':15s} {'compute':>7s} {'comm':>5s} {'f':>5s} {'exposed':>7s} "
             f"{'blocked':>7s} {'skew':>5s} {'step':>6s} {'meas.':>6s} {'ratio':>5s} {'f=0':>6s} {'f=1':>6s}"]
    for mode in MODES:
        r = predict(res[mode])
        lines.append(f"    {mode:15s} {r['compute_ms']:7.1f} {r['comm_ms']:5.1f} {r['overlap']:5.2f} "
                     f"{r['exposed_comm_ms']:7.1f} {r['measured_blocked_ms']:7.1f} {r['skew_ms']:5.1f} "
                     f"{r['step_ms']:6.1f} {r['measured_step_ms']:6.1f} {r['ratio']:5.2f} "
                     f"{r['step_ms_no_overlap']:6.1f} {r['step_ms_full_overlap']:6.1f}")
    r = predict(res["none"])
    lines += [f"    comm = {r['intra_bytes'] / 1e6:.2f} MB / {r['intra_gbs']:.3g} GB/s inside nodes + "
              f"{r['inter_bytes'] / 1e6:.2f} MB / {r['inter_gbs']:.3g} GB/s between them (none; forward + "
              "backward; GB/s: all_to_all_single of one dispatch's payload on the intra-/inter-node groups; "
              f"on the whole EP group {r['ep_gbs']:.3g})",
              "    compute = measured step - blocked; f = in flight / (in flight + blocked); exposed = the model's "
              "comm not hidden, blocked = the measured; skew = waiting for the last rank to reach each collective "
              "(not in the model); step = predicted at f, at f = 0 and at f = 1"]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seqs", type=int, default=4, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--dispatcher", default="direct", choices=("direct", "two_hop"))
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the three schedules")
    p.add_argument("--bw-iters", type=int, default=10, help="all-to-all calls per bandwidth measurement")
    p.add_argument("--png", default="docs/img/overlap_timeline.png")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import socket
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "rank0.pt")
    mp.spawn(_worker, args=(4, port, a, out), nprocs=4)
    res = torch.load(out, weights_only=False)
    from moeco.parallel.overlap import PHASES
    print(f"4 gloo ranks (2 nodes x 2), {a.seqs} x {a.seq_len} tokens a rank, dim {a.dim}, {a.layers} layers, "
          f"{a.experts} experts, {a.dispatcher}, {a.threads} thread(s) a rank, {os.cpu_count()} CPU cores")
    for mode in MODES:
        steps = [e["step_s"] * 1e3 for e in res[mode]]
        print(f"  {mode:15s} step (fwd+bwd) " + ", ".join(f"{x:.1f}" for x in steps) +
              f" ms (median {statistics.median(steps):.1f})")
    for mode in MODES:  # rank 0's spans, the mean of a step over every step of every round
        print(f"  {mode}, rank 0, mean of {a.steps * a.rounds} steps:")
        for ph in PHASES:
            print("    " + _line(ph, {k: statistics.mean(e[ph][k] for e in res[mode]) for k in res[mode][0][ph]}))
    print("\n".join(_predict_lines(res, a.rounds, a.steps)))
    if a.png:
        e = res["two_microbatch"][_median_round(res["two_microbatch"])]
        plot({ph: e[f"spans_{ph}"] for ph in PHASES}, a.png)
        print(f"  timeline: {a.png}")
    if a.json:
        out = {m: [{k: v for k, v in x.items() if not k.startswith("spans")} for x in r] for m, r in res.items()}
        out["planner"] = {m: predict(res[m]) for m in MODES}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
