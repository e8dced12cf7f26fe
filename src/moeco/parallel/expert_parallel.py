"""Expert parallelism applied to a moeco model from outside, and the training arithmetic across shards.

Placement: EP rank e of P holds the routed experts [e E/P, (e+1) E/P) of every MoE layer (a
GroupedExperts with first_expert = e E/P); everything else (attention, router, shared experts,
embeddings, dense layers) is replicated and trained data-parallel over all W ranks.

Gradients. Each rank's loss L_r is the mean over its own tokens and the step minimises the global
mean (1/W) sum_r L_r. DDP all-reduces the replicated parameters' gradients and divides by W. An expert
parameter on rank p already holds, after backward, sum_{r in its EP group} dL_r/dW (the all-to-all's
backward brought every source's contribution home); ranks in other EP groups hold the same experts
(the replica group, W/P ranks), so

    grad(W_expert) = (1/W) * all_reduce_sum over the replica group of the local gradient.

Global gradient norm, for clipping: replicated parameters count once (they are equal everywhere
after DDP), each expert shard once:

    ||g||^2 = ||g_replicated||^2 + all_reduce_sum over the EP group of ||g_local experts||^2

and every rank scales by the same min(1, clip / ||g||). The routing bias moves from expert loads summed
over all ranks (BalanceHook's all-reduce; each router counts its own tokens for all E experts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeco.errors import ConfigError
from moeco.model.moe import GroupedExperts
from moeco.parallel.dispatch import DISPATCHERS
from moeco.parallel.mesh import Mesh, MeshSpec
from moeco.parallel.route import TrafficCounter

EXPERT_TAG = ".mlp.experts."


def shard_experts(model, spec: MeshSpec) -> None:
    """Replace each MoE's experts by this rank's range (weights sliced from the full ones unless on meta)."""
    P, e = spec.ep, spec.ep_rank
    if P == 1:
        return
    spec.check_model(model.config)
    for _, moe in model.moe_layers():
        old = moe.experts
        if not isinstance(old, GroupedExperts):
            raise ConfigError(f"parallel.ep = {P} needs GroupedExperts (training or high-precision weights), "
                              f"not {type(old).__name__}; load without keep_fp8")
        if old.first_expert != 0 or old.w13_E2FD.shape[0] != moe.n_experts:
            continue  # already sharded
        L = moe.n_experts // P
        F_, D = old.w2_EDF.shape[2], old.w2_EDF.shape[1]
        with torch.device(old.w13_E2FD.device):
            new = GroupedExperts(L, D, F_, model.recipe, first_expert=e * L)
        if not old.w13_E2FD.is_meta:
            with torch.no_grad():
                new.w13_E2FD.copy_(old.w13_E2FD[e * L:(e + 1) * L])
                new.w2_EDF.copy_(old.w2_EDF[e * L:(e + 1) * L])
        moe.experts = new


def apply_expert_parallel(model, mesh: Mesh, dispatcher: str = "two_hop", fp8: bool = False) -> TrafficCounter:
    """Shard the experts and give every MoE an all-to-all dispatcher; returns the shared byte counter."""
    spec = mesh.spec
    if dispatcher not in DISPATCHERS:
        raise ConfigError(f"parallel.dispatcher = {dispatcher!r}; choose one of {', '.join(DISPATCHERS)}")
    counter = TrafficCounter(spec.gpus_per_node, spec.rank)
    if spec.ep == 1:
        return counter
    shard_experts(model, spec)
    pow2 = bool(getattr(model.recipe, "act_pow2", False))  # the FP8 recipe's activation scale format
    for _, moe in model.moe_layers():
        moe.dispatcher = DISPATCHERS[dispatcher](mesh, fp8=fp8, counter=counter, pow2_scale=pow2)
    return counter


def expert_param_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if EXPERT_TAG in n]


def split_params(model):
    """(replicated parameters, expert-sharded parameters), each a list."""
    rep, exp = [], []
    for n, p in model.named_parameters():
        (exp if EXPERT_TAG in n else rep).append(p)
    return rep, exp


@torch.no_grad()
def reduce_expert_grads(model, mesh: Mesh) -> None:
    """grad <- (1/W) * sum over the replica group; see the module docstring."""
    W = mesh.spec.world
    if W == 1:
        return
    _, exp = split_params(model)
    grads = [p.grad for p in exp if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    if mesh.replicas > 1:
        dist.all_reduce(flat, group=mesh.replica_group)
    flat /= W
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def clip_grad_norm_sharded(model, mesh: Mesh, max_norm: float) -> torch.Tensor:
    """Global gradient norm over replicated and sharded parameters; scales every gradient alike."""
    rep, exp = split_params(model)
    dev = next(model.parameters()).device

    def sq(params):
        gs = [p.grad.float().pow(2).sum() for p in params if p.grad is not None]
        return torch.stack(gs).sum() if gs else torch.zeros((), device=dev)

    local_exp = sq(exp)
    if mesh.spec.ep > 1:
        dist.all_reduce(local_exp, group=mesh.ep_group)
    total = (sq(rep) + local_exp).sqrt()
    if max_norm != float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in rep + exp:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return total


