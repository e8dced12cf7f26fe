"""Worker functions of the overlap tests (each runs on every rank of a gloo group)."""

from __future__ import annotations

from ep_workers import _mesh, batch, build_model, step_loss

ROWS = 2  # sequences per rank: one per micro-batch
# none: the plain forward; sequential: the two micro-batches one after the other; two_microbatch: interleaved,
# forward and backward; forward_only: interleaved forward, each gradient's all-to-all sent and received at once
MODES = ("none", "sequential", "two_microbatch", "forward_only")


def reference(config, rows: int, mode: str = "none"):
    """Single process, the whole batch: logits, loss, gradients of the mean loss."""
    from moeco.parallel.overlap import set_overlap

    model = build_model(config)
    set_overlap(model, mode)
    out, loss = step_loss(model, batch(config, B=rows))
    loss.backward()
    return {"logits": out.logits.detach(), "loss": loss.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


def overlap_step(rank, config, gpus_per_node, dispatchers=("direct", "two_hop"), modes=MODES):
    """Each rank: its ROWS sequences, EP over all ranks; forward + backward under each schedule (MODES).

    Gradients: replicated ones summed over ranks / W, expert ones / W (the gradient of the mean loss)."""
    import torch.distributed as dist

    from moeco.parallel.expert_parallel import EXPERT_TAG, apply_expert_parallel
    from moeco.parallel.overlap import set_overlap

    W = dist.get_world_size()
    mesh = _mesh(W, gpus_per_node)
    seqs = batch(config, B=ROWS * W)[rank * ROWS:(rank + 1) * ROWS]
    res = {}
    for dispatcher, mode in [(d, m) for d in dispatchers for m in modes]:
        model = build_model(config)
        apply_expert_parallel(model, mesh, dispatcher)
        sched = set_overlap(model, "none" if mode == "none" else "two_microbatch")
        if mode == "sequential":
            sched.interleave = False
        if mode == "forward_only":
            sched.overlap_backward = False
        out, loss = step_loss(model, seqs)
        loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.clone()
            if EXPERT_TAG not in n:
                dist.all_reduce(g)
            grads[n] = g / W
        first = {n: m.experts.first_expert for n, m in
                 ((f"model.layers.{i}.mlp" if i < config.num_hidden_layers else
                   f"mtp.{i - config.num_hidden_layers}.mlp", m) for i, m in model.moe_layers())}
        losses = loss.detach().reshape(1)
        dist.all_reduce(losses)
        res[dispatcher, mode] = {"logits": out.logits.detach(), "loss": losses[0] / W, "grads": grads, "first": first,
                     "order": sched.last.order() if sched is not None else None,
                     "order_backward": sched.last.order("backward") if sched is not None else None}
    return res
