"""The device mesh: W ranks as N nodes x G GPUs per node, cut into expert-parallel (EP) groups.

Notation (ranks are torchrun's global ranks r = 0..W-1):

    G        GPUs per node: torchrun's --nproc-per-node, or `parallel.gpus_per_node` to let one host
             stand in for several nodes (CPU tests, a multi-GPU host)
    node(r)  = r // G            local(r) = r % G
    ep       ranks per EP group; groups are contiguous blocks [b*ep, (b+1)*ep), b = r // ep
    e        = r % ep, this rank's index in its EP group; it holds experts [e*E/ep, (e+1)*E/ep)
    N_ep     nodes one EP group spans (ep // G, or 1 when ep <= G); G_ep its GPUs per node

Process groups (every rank creates all of them, in one order, as torch.distributed requires):

    ep_group       the ep ranks of my block: the all-to-all of the direct dispatcher
    intra_group    my block's ranks on my node (G_ep of them): the two-hop dispatcher's second hop
    inter_group    my block's ranks with my local index, one per node (N_ep): the first hop
    replica_group  the W/ep ranks holding the same experts as me (one per block): expert gradients
    (data parallelism of everything else runs over all W ranks: DDP on the default group)

Node-limited placement: routing group j (experts [j*E/n_group, (j+1)*E/n_group)) lies on the node
holding those experts. With n_group a multiple of N_ep every node holds whole groups, so a token that
may pick from `topk_group` groups reaches at most topk_group nodes; any other n_group is an error
(when routing is group-limited and the group spans more than one node). `MeshSpec` checks everything
from the environment and the config alone, so every rank raises the same one-line error before any
collective runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.distributed as dist

from moeco.config import ModelConfig
from moeco.errors import ConfigError


@dataclass(frozen=True)
class MeshSpec:
    world: int
    rank: int
    gpus_per_node: int
    ep: int

    @classmethod
    def from_env(cls, ep: int = 1, gpus_per_node: int = 0, env=None) -> "MeshSpec":
        """From torchrun's variables; gpus_per_node 0 = LOCAL_WORLD_SIZE (the real node size)."""
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        if gpus_per_node < 0:
            raise ConfigError(f"parallel.gpus_per_node = {gpus_per_node} is invalid: use 0 (torchrun's "
                              "--nproc-per-node) or a positive number")
        if ep == 1 and gpus_per_node and local_world % gpus_per_node:
            gpus_per_node = 0  # no expert parallelism: the node layout plays no part
        if gpus_per_node and local_world % gpus_per_node:
            raise ConfigError(f"parallel.gpus_per_node = {gpus_per_node} does not divide torchrun's "
                              f"--nproc-per-node = {local_world}; choose a divisor of it (or 0)")
        return cls(world, rank, gpus_per_node or local_world, ep).validated()

    def validated(self) -> "MeshSpec":
        W, G, ep = self.world, self.gpus_per_node, self.ep
        if not isinstance(ep, int) or ep < 1 or W % ep:
            raise ConfigError(f"parallel.ep = {ep!r} must be a positive divisor of the {W} ranks "
                              f"(torchrun's --nnodes x --nproc-per-node); e.g. parallel.ep = {W}")
        if W % G:
            raise ConfigError(f"{W} ranks do not fill nodes of parallel.gpus_per_node = {G}; "
                              "choose a divisor of the rank count")
        if ep > G and ep % G:
            raise ConfigError(f"parallel.ep = {ep} spans a partial node of {G} GPUs; use a multiple of "
                              f"{G} or a divisor of it")
        if ep < G and G % ep:
            raise ConfigError(f"parallel.ep = {ep} does not divide a node's {G} GPUs; use a divisor of "
                              f"{G} or a multiple of it")
        return self

    # ---- derived layout (pure) ------------------------------------------------------------
    @property
    def ep_nodes(self) -> int:
        return max(1, self.ep // self.gpus_per_node)

    @property
    def ep_gpus_per_node(self) -> int:
        return min(self.ep, self.gpus_per_node)

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def ep_base(self) -> int:
        return self.rank - self.ep_rank

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def ep_ranks(self) -> list[int]:
        return list(range(self.ep_base, self.ep_base + self.ep))

    def check_model(self, config: ModelConfig) -> None:
        """The model's experts split evenly over ep ranks and its routing groups map onto the nodes."""
        E = config.n_routed_experts
        if self.ep == 1:
            return
        if E == 0:
            raise ConfigError(f"parallel.ep = {self.ep} needs routed experts; the model has none (use parallel.ep = 1)")
        if E % self.ep:
            raise ConfigError(f"parallel.ep = {self.ep} does not divide the {E} routed experts; "
                              f"choose a divisor of {E}")
        N = self.ep_nodes
        grouped = config.topk_method != "greedy" and config.n_group > 1
        if N > 1 and grouped and config.n_group % N:
            fix = (f"set model.n_group to a multiple of {N}" if E % N == 0 else "change parallel.ep")
            raise ConfigError(f"model.n_group = {config.n_group} routing groups cannot lie on whole nodes of "
                              f"the {N} that parallel.ep = {self.ep} spans (gpus_per_node = "
                              f"{self.gpus_per_node}); {fix}, or parallel.gpus_per_node so that "
                              f"{config.n_group} is a multiple of the node count")

    def max_nodes_per_token(self, config: ModelConfig) -> int:
        """The most nodes of the EP group one token's experts can lie on under node-limited routing."""
        N = self.ep_nodes
        if config.topk_method == "greedy" or config.n_group <= 1 or N == 1:
            return min(N, config.num_experts_per_tok)
        return min(N, config.topk_group)


class Mesh:
    """A validated MeshSpec plus its process groups (call after init_process_group on every rank)."""

    def __init__(self, spec: MeshSpec):
        self.spec = spec
        W, ep, G = spec.world, spec.ep, spec.gpus_per_node
        self.ep_group = self.intra_group = self.inter_group = self.replica_group = None
        if W == 1:
            return
        Gp, Np = spec.ep_gpus_per_node, spec.ep_nodes
        for base in range(0, W, ep):  # every rank creates every group, in the same order
            ranks = list(range(base, base + ep))
            g = dist.new_group(ranks)
            if base == spec.ep_base:
                self.ep_group = g
            for n in range(Np):
                members = ranks[n * Gp:(n + 1) * Gp]
                g = dist.new_group(members)
                if spec.rank in members:
                    self.intra_group = g
            for i in range(Gp):
                members = ranks[i::Gp]
                g = dist.new_group(members)
                if spec.rank in members:
                    self.inter_group = g
        for e in range(ep):
            members = list(range(e, W, ep))
            g = dist.new_group(members)
            if spec.rank in members:
                self.replica_group = g

    # Global ranks of each group's members, in group-rank order.
    def ep_ranks(self) -> list[int]:
        return self.spec.ep_ranks()

    def intra_ranks(self) -> list[int]:
        s = self.spec
        Gp = s.ep_gpus_per_node
        first = s.ep_base + (s.ep_rank // Gp) * Gp
        return list(range(first, first + Gp))

    def inter_ranks(self) -> list[int]:
        s = self.spec
        Gp = s.ep_gpus_per_node
        return list(range(s.ep_base + s.ep_rank % Gp, s.ep_base + s.ep, Gp))

    @property
    def replicas(self) -> int:
        return self.spec.world // self.spec.ep
