"""The HTTP front door of expert-parallel serving (`torchrun --nproc-per-node P -m moeco serve MODEL --ep P`).

Rank 0 runs the server over a `FrontEngine`, the LLMEngine interface over all ranks' engines; the
other ranks `follow`. Per step, on a gloo control group:

    rank 0 -> all   the adds (each to the rank with the fewest requests in flight) and aborts queued
                    since the last step (broadcast_object_list)
    every rank      applies those addressed to it, then steps its engine (the lock-step of moeco.serve.ep)
    all -> rank 0   each rank's RequestOutputs and stats (gather_object)

An idle server steps nothing: the followers wait in the next broadcast, so the control group's
timeout is long (7 days); `close()` (at shutdown) releases them.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from moeco.errors import ConfigError
from moeco.serve.engine import RequestOutput
from moeco.serve.sampling_params import RequestError


def control_group():
    """A gloo group of all ranks for the front door's requests and outputs (call on every rank)."""
    return dist.new_group(backend="gloo", timeout=timedelta(days=7))


def _lockstep(engine, group, ops):
    """One front-door step on every rank; rank 0 gets [(outputs, stats)] per rank, the others [];
    None when rank 0 sent the stop (ops None)."""
    box = [ops]
    dist.broadcast_object_list(box, src=0, group=group)
    if box[0] is None:
        return None
    rank, outputs = dist.get_rank(group), []
    for kind, owner, *rest in box[0]:
        if owner != rank:
            continue
        if kind == "abort":
            engine.abort(rest[0])
            continue
        prompt, params, rid = rest
        try:
            engine.add_request(prompt, params, rid)
        except RequestError as exc:  # checked on rank 0 already; a rank's smaller cache can still refuse
            outputs.append(RequestOutput(rid, [], True, None, str(exc), len(prompt), 0))
    outputs += engine.step()
    gathered = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object((outputs, engine.stats()), gathered, dst=0, group=group)
    return gathered if rank == 0 else []


def follow(engine, group) -> None:
    """Ranks other than 0 under `moeco serve --ep`: step with rank 0 until it stops."""
    while _lockstep(engine, group, []) is not None:
        pass


class FrontEngine:
    """Rank 0's LLMEngine interface over every rank's engine, for the HTTP server (AsyncEngine).

    Requests are checked here (a bad one raises RequestError at once) and queued for the rank with
    the fewest requests in flight; `step` sends the queue, steps every rank and returns all ranks'
    outputs. Anything else (tokenizer, max_model_len, device) is rank 0's engine's."""

    def __init__(self, engine, group):
        self.engine, self.group = engine, group
        self.world = dist.get_world_size(group)
        self.owner: dict[str, int] = {}  # request id -> the rank serving it
        self.load = [0] * self.world  # requests in flight per rank
        self.ops: list[tuple] = []
        self.rank_stats = [engine.stats()] * self.world

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def add_request(self, prompt_token_ids, params=None, request_id=None, prefill_only=False) -> str:
        if prefill_only:
            raise ConfigError("disaggregated prefill is not supported with ep > 1")
        if request_id is not None and request_id in self.owner:
            raise RequestError("request_id", f"request_id {request_id!r} is already in use")
        seq = self.engine._new_sequence(prompt_token_ids, params, request_id)  # the engine's own checks
        rank = min(range(self.world), key=self.load.__getitem__)
        self.owner[seq.request_id] = rank
        self.load[rank] += 1
        self.ops.append(("add", rank, seq.token_ids, seq.params, seq.request_id))
        return seq.request_id

    def abort(self, request_id: str) -> None:
        rank = self.owner.pop(request_id, None)
        if rank is not None:
            self.load[rank] -= 1
            self.ops.append(("abort", rank, request_id))

    def has_unfinished(self) -> bool:
        return bool(self.owner)

    def step(self):
        ops, self.ops = self.ops, []
        gathered = _lockstep(self.engine, self.group, ops)
        self.rank_stats = [st for _, st in gathered]
        outputs = [o for outs, _ in gathered for o in outs]
        for o in outputs:
            if o.finished and o.request_id in self.owner:
                self.load[self.owner.pop(o.request_id)] -= 1
        return outputs

    def stats(self) -> dict:
        """Counts summed over the ranks; cache usage of all blocks; the prefix-cache hit rate is the ranks' mean."""
        per = self.rank_stats
        out = {k: sum(s[k] for s in per) for k, v in per[0].items() if isinstance(v, int)}
        out["cache_usage"] = 1 - out["free_blocks"] / out["total_blocks"]
        out["prefix_cache_hit_rate"] = sum(s["prefix_cache_hit_rate"] for s in per) / len(per)
        out["spec_acceptance_rate"] = None
        return out

    def close(self) -> None:
        """Release the followers (every request must be finished or aborted)."""
        _lockstep(self.engine, self.group, None)
