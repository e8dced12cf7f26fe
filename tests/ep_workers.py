"""Worker functions of the expert-parallel tests (each runs on every rank of a gloo group)."""

from __future__ import annotations

import torch


def _mesh(ep, gpus_per_node):
    from moeco.parallel.mesh import Mesh, MeshSpec

    spec = MeshSpec.from_env(ep=ep, gpus_per_node=gpus_per_node)
    return Mesh(spec)


def dispatch_layer(rank, T, D, E, K, gpus_per_node, idx_all, fp8=False, dtype=torch.float32):
    """Both dispatchers on one rank's slice of a given routing: x_CD, counts, output, grads, bytes."""
    from moeco.model.moe import Routing
    from moeco.parallel.dispatch import AllToAllDispatcher, TwoHopDispatcher

    W = torch.distributed.get_world_size()
    mesh = _mesh(W, gpus_per_node)
    g = torch.Generator().manual_seed(1)
    x_all = torch.randn(W * T, D, generator=g).to(dtype)
    w_all = torch.rand(W * T, K, generator=g)
    out = {}
    for name, cls in (("direct", AllToAllDispatcher), ("two_hop", TwoHopDispatcher)):
        x = x_all[rank * T:(rank + 1) * T].clone().requires_grad_()
        w = w_all[rank * T:(rank + 1) * T].clone().requires_grad_()
        idx = idx_all[rank * T:(rank + 1) * T]
        d = cls(mesh, fp8=fp8)
        x_CD, tpe, h = d.dispatch(x, Routing(w, idx, None), E)
        L = E // W
        scale = torch.arange(1, L + 1, dtype=dtype).repeat_interleave(tpe)[:, None]
        y = d.combine(x_CD * scale, h)  # expert e of this rank multiplies by (e + 1)
        y.pow(2).sum().backward()
        out[name] = {"x_CD": x_CD.detach(), "tpe": tpe, "y": y.detach(), "gx": x.grad, "gw": w.grad,
                     "bytes": dict(d.counter.bytes)}
    return out


def build_model(config, seed=0, precision="fp32"):
    from moeco import Transformer

    recipe = None
    if precision == "fp8":
        from moeco.fp8.recipe import Fp8Recipe

        recipe = Fp8Recipe(backend="reference")
    torch.manual_seed(seed)
    return Transformer(config, recipe=recipe)


def batch(config, B=4, S=9, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (B, S), generator=g)


def step_loss(model, seqs):
    from moeco.train.trainer import lm_losses

    out = model(seqs[:, :-1], return_mtp=True, return_aux=True)
    lm, mtp = lm_losses(out, seqs[:, 1:])
    return out, lm + 0.3 * mtp + 0.01 * out.balance_loss


def reference_step(config, precision="fp32", clip=0.5, lr=1e-3, per_row=False):
    """Single process: logits, loss, grads, grad norm and parameters after one AdamW step.

    per_row: one micro-step per row (gradient accumulation), so that FP8's 128x1 Wgrad tiles along the
    tokens cover what each data-parallel rank sees; otherwise the whole batch in one forward."""
    model = build_model(config, precision=precision)
    seqs = batch(config)
    if per_row:
        outs = []
        for r in range(seqs.shape[0]):
            out_r, loss_r = step_loss(model, seqs[r:r + 1])
            loss_r.backward()  # summed, then divided, as DDP does (FP8 tiles see the same gradient values)
            outs.append((out_r.logits.detach(), loss_r.detach()))
        for p in model.parameters():
            if p.grad is not None:
                p.grad /= seqs.shape[0]
        out = type("Out", (), {"logits": torch.cat([o[0] for o in outs])})()
        loss = torch.stack([o[1] for o in outs]).mean()
    else:  # the gradient of B x the mean, divided by B after: the values a rank's backward sees (see above)
        out, loss = step_loss(model, seqs)
        (loss * seqs.shape[0]).backward()
        for p in model.parameters():
            if p.grad is not None:
                p.grad /= seqs.shape[0]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    torch.optim.AdamW(model.parameters(), lr=lr).step()
    return {"logits": out.logits.detach(), "loss": loss.detach(), "grads": grads, "norm": norm,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def ep_step(rank, config, dispatchers, gpus_per_node, precision="fp32", fp8_dispatch=False, clip=0.5, lr=1e-3):
    """Each rank: its row of the batch, EP over all ranks, DDP for the rest; the same quantities."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moeco.parallel.expert_parallel import (apply_expert_parallel, clip_grad_norm_sharded,
                                                expert_param_names, reduce_expert_grads)

    W = torch.distributed.get_world_size()
    mesh = _mesh(W, gpus_per_node)
    results = {}
    for name in dispatchers:
        model = build_model(config, precision=precision)
        counter = apply_expert_parallel(model, mesh, name, fp8=fp8_dispatch)
        DDP._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))
        ddp = DDP(model, broadcast_buffers=False)
        seqs = batch(config)[rank:rank + 1]
        out, loss = step_loss(ddp, seqs)
        loss.backward()
        reduce_expert_grads(model, mesh)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        norm = clip_grad_norm_sharded(model, mesh, clip)
        torch.optim.AdamW(model.parameters(), lr=lr).step()
        losses = torch.stack([loss.detach()])
        torch.distributed.all_reduce(losses)
        first = {n: m.experts.first_expert for n, m in
                 ((f"model.layers.{i}.mlp" if i < config.num_hidden_layers else
                   f"mtp.{i - config.num_hidden_layers}.mlp", m) for i, m in model.moe_layers())}
        results[name] = {"logits": out.logits.detach(), "loss": losses / W, "grads": grads, "norm": norm,
                         "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                         "first": first, "bytes": dict(counter.bytes), "tokens": counter.tokens}
    return results


def train_run(rank, overrides, out, resume=False):
    """moeco's trainer on every rank (the process group is already up, as under torchrun)."""
    from moeco.train.config import TrainConfig
    from moeco.train.trainer import train

    losses = {}
    if resume:  # the run's own config, with the overrides on top (as `moeco train --resume OUT --set ...`)
        from moeco.train.run_dir import resume_config

        cfg = resume_config(out, [o for o in overrides if o.startswith(("parallel.", "train.steps"))])
    else:
        cfg = TrainConfig().with_overrides(overrides)
    def record(step, rec):
        losses[step] = (rec["loss"], rec.get("ep_inter_bytes_per_token"))

    summary = train(cfg, out, resume=resume, verbose=False, on_step=record)
    return {"losses": losses, "summary": summary}


def node_limit(rank, config):
    """4 nodes x 1 GPU: nodes each token's experts reach under the two-hop dispatcher, through a model forward."""
    from moeco.parallel.dispatch import TwoHopDispatcher
    from moeco.parallel.expert_parallel import apply_expert_parallel

    mesh = _mesh(4, 1)
    model = build_model(config)
    apply_expert_parallel(model, mesh, "two_hop")
    reached = []
    for _, moe in model.moe_layers():
        orig = moe.dispatcher.dispatch

        def spy(x, routing, n, orig=orig):
            x_CD, tpe, h = orig(x, routing, n)
            reached.append(torch.bincount(h.token_of_item1, minlength=x.shape[0]))
            return x_CD, tpe, h
        moe.dispatcher.dispatch = spy
        assert isinstance(moe.dispatcher, TwoHopDispatcher)
    with torch.no_grad():
        model(batch(config)[rank:rank + 1, :-1])
    return torch.cat(reached)


def dead_rank(rank, timeout_s):
    """Rank 3 dies before the first dispatch; the others must fail with PeerLost, quickly."""
    import os
    import time

    from moeco.model.moe import Routing
    from moeco.parallel.dispatch import TwoHopDispatcher

    mesh = _mesh(4, 2)
    torch.distributed.barrier()
    if rank == 3:
        os._exit(1)
    t0 = time.monotonic()
    idx = torch.tensor([[0, 3, 6]])
    try:
        TwoHopDispatcher(mesh).dispatch(torch.randn(1, 8), Routing(torch.rand(1, 3), idx, None), 8)
    except Exception as exc:  # noqa: BLE001
        return {"type": type(exc).__name__, "msg": str(exc), "s": time.monotonic() - t0}
    return {"type": None, "s": time.monotonic() - t0}


def ep_generate(rank, path, dispatcher):
    """Greedy generation with this rank's experts only (every rank the same prompt)."""
    from moeco.generate import generate
    from moeco.parallel.checkpoint import load_expert_parallel

    model, mesh, _ = load_expert_parallel(path, 4, 2, dispatcher=dispatcher)
    assert model.moe_layers().__next__()[1].experts.w13_E2FD.shape[0] == model.config.n_routed_experts // 4
    prompt = torch.tensor([[1, 5, 9, 13], [2, 4, 6, 8]])
    with torch.no_grad():
        return generate(model, prompt, 6)


def ep_load_error(rank, path):
    """load_expert_parallel on a checkpoint missing one rank's experts: every rank must raise, promptly."""
    import time

    from moeco.errors import MoecoError
    from moeco.parallel.checkpoint import load_expert_parallel

    t0 = time.monotonic()
    try:
        load_expert_parallel(path, 4, 2, timeout_s=30)
    except MoecoError as exc:
        return {"type": type(exc).__name__, "msg": str(exc), "s": time.monotonic() - t0}
    return {"type": None}


def empty_rank(rank):
    """Rank 1 routes no tokens and rank 2's experts get none: both dispatchers, forward and backward."""
    from moeco.model.moe import Routing
    from moeco.parallel.dispatch import AllToAllDispatcher, TwoHopDispatcher

    mesh = _mesh(4, 2)
    T = 0 if rank == 1 else 2
    out = []
    for cls in (AllToAllDispatcher, TwoHopDispatcher):
        x = torch.randn(T, 8, requires_grad=True)
        w = torch.rand(T, 3, requires_grad=True)
        d = cls(mesh)
        x_CD, tpe, h = d.dispatch(x, Routing(w, torch.tensor([[0, 3, 6], [1, 2, 7]])[:T], None), 8)
        y = d.combine(x_CD * 2, h)
        y.sum().backward()
        out.append((torch.allclose(y, 2 * w.sum(1, keepdim=True) * x), tpe.tolist(), x.grad.shape))
    return out


def ep_serve(rank, path, prompts_of_rank, engine_options, max_tokens):
    """The offline LLM with this rank's experts over its own prompts (possibly none): tokens, steps taken."""
    from moeco.serve import LLM, SamplingParams

    llm = LLM(path, **engine_options)
    steps, step = [0], llm.engine.step

    def counted():
        steps[0] += 1
        return step()
    llm.engine.step = counted
    outs = llm.generate(prompts_of_rank[rank], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    experts = next(llm.engine.model.moe_layers())[1].experts
    return {"tokens": [o.token_ids for o in outs], "steps": steps[0], "first_expert": experts.first_expert,
            "num_experts": experts.w13_E2FD.shape[0]}
