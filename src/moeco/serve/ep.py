"""Expert-parallel serving: the routed experts sharded over an EP group, attention data-parallel.

Every rank runs its own LLMEngine (`EngineConfig.ep = P`, under torchrun): its own requests,
scheduler and paged latent cache. Attention, router, shared experts, dense layers and head are
replicated; rank e of the group holds experts [e E/P, (e+1) E/P) of every MoE layer (read alone from
the checkpoint) and each MoE layer's dispatch and combine are all-to-alls over the group. Those are
collectives, so every rank must run the same forwards in the same order, work or not:

    step()            schedule locally -> all-reduce (max) of [has prefills, has decodes]
                      -> the prefill forward if any rank prefills, then the decode forward if any decodes;
                         a rank with nothing of that kind forwards 0 rows (`ModelRunner.idle`): its MoE
                         layers send and receive their share of the others' tokens, with none of its own
    has_unfinished()  all-reduce (max) of "I have requests left": every rank steps until no rank has

Both are collectives: call them on every rank of the group together (`LLM.generate` does). A
sequence's tokens meet the same weights and experts as on one process, so greedy outputs are the
single-process engine's (up to the rounding of other batch shapes and of the combine's sum order).

With `overlap = "two_microbatch"` every forward, prefill and decode, runs as two micro-batches
(moeco.parallel.overlap) on every rank, even of one sequence or none, so the collectives still match.

Not with ep > 1 (one-line errors at start): MTP speculation (its verify and draft forwards vary per
rank), torch.compile of the decode step, and keep_fp8 experts. CUDA graphs are not captured: the
dispatchers size each all-to-all from split counts read back to the host every layer, which a graph
cannot replay, so decode runs eager.

The HTTP front door over the ranks' engines: moeco.serve.ep_front.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeco.errors import ConfigError


class StepSync:
    """The per-step agreement of the ranks of one EP group: one all-reduce of a few flags."""

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device

    def any(self, *flags: bool) -> list[bool]:
        """For each flag: is it set on any rank of the group?"""
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in t.tolist()]


def check_config(c) -> None:
    """One-line errors for what expert-parallel serving does not do (raised alike on every rank)."""
    for on, what in ((c.speculative is not None, f"speculative = {c.speculative!r}"),
                     (c.compile, "compile = True"), (c.keep_fp8, "keep_fp8 = True")):
        if on:
            raise ConfigError(f"{what} is not supported with ep = {c.ep} (expert-parallel serving); "
                              "turn it off or serve with ep = 1")


def expert_parallel_model(c, model, dtype: torch.dtype):
    """(model with this rank's experts and EP dispatchers, StepSync) for EngineConfig `c`.

    model None: loaded from c.model_dir, this rank's experts only; otherwise a full model, sharded here.
    Starts the process group from torchrun's environment if it is not up yet."""
    from moeco.parallel.checkpoint import load_expert_parallel
    from moeco.parallel.dist import Dist
    from moeco.parallel.expert_parallel import apply_expert_parallel
    from moeco.parallel.mesh import Mesh, MeshSpec

    check_config(c)
    spec = MeshSpec.from_env(c.ep, c.gpus_per_node)
    if model is None:
        model, mesh, _ = load_expert_parallel(c.model_dir, c.ep, c.gpus_per_node, c.dispatcher, device=c.device,
                                              dtype=dtype)
    else:
        spec.check_model(model.config)
        Dist(c.device)
        mesh = Mesh(spec)
        apply_expert_parallel(model, mesh, c.dispatcher)
    return model, StepSync(mesh.ep_group, model.model.embed_tokens.weight.device)
