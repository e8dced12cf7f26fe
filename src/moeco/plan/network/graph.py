"""Networks as graphs of directed links: GPUs, NVSwitches, NICs, leaves, spines (and FT3 cores).

Every cable is two directed links with the same capacity (per direction). A node of G GPUs has one
NVSwitch; GPU g has an NVLink up (g -> nvs) and down (nvs -> g) link at the device's NVLink speed,
and one NIC cable up (g -> leaf) and down (leaf -> g) at the NIC speed (400G IB or RoCE: 50 GB/s).
Switches have radix k: a leaf gives k/2 ports to NICs and k/2 to uplinks.

    ft2   two-layer fat tree, NICs placed top-of-rack: GPU n*G + r on leaf (n*G + r) // (k/2);
          ceil(N / (k/2)) leaves (<= k), k/2 spines, one cable from every leaf to every spine
    mrft  multi-rail fat tree: one plane, NIC r of every node on rail r's leaves (k/2 nodes per
          leaf), G * ceil(nodes / (k/2)) leaves (<= k) sharing k/2 spines
    mpft  multi-plane fat tree: plane r is its own ft2 holding NIC r of every node (k/2 nodes per
          leaf, <= k leaves and k/2 spines per plane); planes share nothing but the nodes' NVLink
    ft3   three-layer fat tree, top-of-rack placement: pods of k/2 leaves and k/2 aggregation
          switches (all-to-all inside the pod), aggregation switch j of every pod joined to its own
          k/2 cores; up to k pods, k^3/4 NICs

Only the switches the cluster needs are built (a partly filled fat tree keeps its full bisection:
every leaf still has k/2 uplinks). Equal-cost paths between two leaves are the up-down paths
through their nearest common level: k/2 spines for ft2/mrft/mpft, k/2 aggregation switches inside
an ft3 pod, (k/2)^2 cores between ft3 pods. `switch_paths` lists them over live links only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moeco.errors import ConfigError
from moeco.plan.hardware import Link

NETWORK_TOPOLOGIES = ("ft2", "mpft", "mrft", "ft3")


@dataclass
class Network:
    topology: str
    nodes: int
    gpus_per_node: int
    radix: int
    nic: Link
    nvlink: Link
    cap_gbs: list = field(default_factory=list)  # [L] per-direction capacity
    kind: list = field(default_factory=list)  # [L] "nvlink" | "nic" | "leaf-spine" | ...
    alive: np.ndarray | None = None  # [L] bool
    nvl_up: list = field(default_factory=list)  # [gpus] link ids
    nvl_down: list = field(default_factory=list)
    nic_up: list = field(default_factory=list)
    nic_down: list = field(default_factory=list)
    leaf_of: list = field(default_factory=list)  # [gpus] switch id of the NIC's leaf
    port_of: list = field(default_factory=list)  # [gpus] port index of the NIC on its leaf
    plane_of_switch: dict = field(default_factory=dict)  # switch id -> plane
    level: dict = field(default_factory=dict)  # switch id -> 1 leaf, 2 spine/agg, 3 core
    ups: dict = field(default_factory=dict)  # switch id -> upper switch ids
    downs: dict = field(default_factory=dict)  # switch id -> lower switch ids
    edge: dict = field(default_factory=dict)  # (switch a, switch b) -> link id
    _paths: dict = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def planes(self) -> int:
        return self.gpus_per_node if self.topology == "mpft" else 1

    def node_of(self, g: int) -> int:
        return g // self.gpus_per_node

    def gpu(self, node: int, rank: int) -> int:
        return node * self.gpus_per_node + rank

    def switches(self, level: int, plane: int | None = None) -> list[int]:
        return [s for s, lv in self.level.items()
                if lv == level and (plane is None or self.plane_of_switch[s] == plane)]

    def nic_alive(self, g: int) -> bool:
        return bool(self.alive[self.nic_up[g]] and self.alive[self.nic_down[g]])

    def switch_paths(self, la: int, lb: int) -> list[tuple[int, ...]]:
        """Equal-cost up-down paths (switch-to-switch link ids) from leaf la to leaf lb, live links only."""
        key = (la, lb)
        if key not in self._paths:
            self._paths[key] = [p for p in self._all_paths(la, lb) if all(self.alive[x] for x in p)]
        return self._paths[key]

    def _all_paths(self, la: int, lb: int) -> list[tuple[int, ...]]:
        if la == lb:
            return [()]
        e = self.edge
        common = [s for s in self.ups[la] if s in set(self.ups[lb])]
        if common:
            return [(e[la, s], e[s, lb]) for s in common]
        down_aggs = set(self.ups[lb])
        return [(e[la, a], e[a, c], e[c, a2], e[a2, lb]) for a in self.ups[la] for c in self.ups[a]
                for a2 in self.downs[c] if a2 in down_aggs]

    # ---- building ------------------------------------------------------------------------------
    def _link(self, gbs: float, kind: str) -> int:
        self.cap_gbs.append(gbs)
        self.kind.append(kind)
        return len(self.cap_gbs) - 1

    def _switch(self, level: int, plane: int) -> int:
        s = len(self.level)
        self.level[s] = level
        self.plane_of_switch[s] = plane
        self.ups[s] = []
        self.downs[s] = []
        return s

    def _cable(self, lower: int, upper: int, kind: str) -> None:
        self.edge[lower, upper] = self._link(self.nic.bandwidth_gbs, kind)
        self.edge[upper, lower] = self._link(self.nic.bandwidth_gbs, kind)
        self.ups[lower].append(upper)
        self.downs[upper].append(lower)


def _check(topology: str, nodes: int, gpus_per_node: int, radix: int) -> None:
    if topology not in NETWORK_TOPOLOGIES:
        raise ConfigError(f"--topology = {topology!r} is invalid: choose one of {', '.join(NETWORK_TOPOLOGIES)}")
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--gpus = {nodes * gpus_per_node} with --gpus-per-node = {gpus_per_node} is invalid: "
                          "need at least one node of at least one GPU")
    if radix < 4 or radix % 2:
        raise ConfigError(f"--radix = {radix} is invalid: a switch radix must be an even integer >= 4")
    half = radix // 2
    if topology == "ft2" and nodes * gpus_per_node > radix * half:
        raise ConfigError(f"--radix = {radix} cannot build ft2 for {nodes * gpus_per_node} GPUs: a two-layer fat "
                          f"tree holds k^2/2 = {radix * half} NICs; use a larger --radix or --topology ft3")
    if topology == "mrft" and gpus_per_node * math.ceil(nodes / half) > radix:
        raise ConfigError(f"--radix = {radix} cannot build mrft for {nodes} nodes x {gpus_per_node} rails: it needs "
                          f"{gpus_per_node * math.ceil(nodes / half)} leaves, more than k = {radix}; use a larger "
                          "--radix, --topology mpft or ft3")
    if topology == "mpft" and nodes > radix * half:
        raise ConfigError(f"--radix = {radix} cannot build mpft for {nodes} nodes: a plane holds k^2/2 = "
                          f"{radix * half} NICs; use a larger --radix")
    if topology == "ft3" and nodes * gpus_per_node > radix * half * half:
        raise ConfigError(f"--radix = {radix} cannot build ft3 for {nodes * gpus_per_node} GPUs: a three-layer fat "
                          f"tree holds k^3/4 = {radix * half * half} NICs; use a larger --radix")


def build_network(topology: str, nodes: int, gpus_per_node: int, nic: Link, nvlink: Link,
                  radix: int = 64) -> Network:
    """The graph of `nodes` x `gpus_per_node` GPUs on `topology` with radix-`radix` switches."""
    _check(topology, nodes, gpus_per_node, radix)
    net = Network(topology, nodes, gpus_per_node, radix, nic, nvlink)
    half = radix // 2
    n_gpus = nodes * gpus_per_node
    for _ in range(n_gpus):  # NVLink to the node's NVSwitch
        net.nvl_up.append(net._link(nvlink.bandwidth_gbs, "nvlink"))
        net.nvl_down.append(net._link(nvlink.bandwidth_gbs, "nvlink"))
    net.leaf_of = [0] * n_gpus
    net.port_of = [0] * n_gpus

    def fat_tree_2(plane: int, nics: list[int]) -> None:
        leaves = [net._switch(1, plane) for _ in range(math.ceil(len(nics) / half))]
        spines = [net._switch(2, plane) for _ in range(half)] if len(leaves) > 1 else []
        for i, g in enumerate(nics):
            net.leaf_of[g], net.port_of[g] = leaves[i // half], i % half
        for leaf in leaves:
            for spine in spines:
                net._cable(leaf, spine, "leaf-spine")

    if topology == "ft2":
        fat_tree_2(0, list(range(n_gpus)))
    elif topology == "mpft":
        for r in range(gpus_per_node):
            fat_tree_2(r, [net.gpu(n, r) for n in range(nodes)])
    elif topology == "mrft":
        per_rail = math.ceil(nodes / half)
        leaves = [net._switch(1, 0) for _ in range(gpus_per_node * per_rail)]
        spines = [net._switch(2, 0) for _ in range(half)] if len(leaves) > 1 else []
        for n in range(nodes):
            for r in range(gpus_per_node):
                g = net.gpu(n, r)
                net.leaf_of[g], net.port_of[g] = leaves[r * per_rail + n // half], n % half
        for leaf in leaves:
            for spine in spines:
                net._cable(leaf, spine, "leaf-spine")
    else:  # ft3
        n_leaves = math.ceil(n_gpus / half)
        pods = math.ceil(n_leaves / half)
        if pods == 1:
            fat_tree_2(0, list(range(n_gpus)))
        else:
            leaves = [net._switch(1, 0) for _ in range(n_leaves)]
            cores = [[net._switch(3, 0) for _ in range(half)] for _ in range(half)]  # [agg index][core]
            for p in range(pods):
                aggs = [net._switch(2, 0) for _ in range(half)]
                for leaf in leaves[p * half:(p + 1) * half]:
                    for a in aggs:
                        net._cable(leaf, a, "leaf-agg")
                for j, a in enumerate(aggs):
                    for c in cores[j]:
                        net._cable(a, c, "agg-core")
            for g in range(n_gpus):
                net.leaf_of[g], net.port_of[g] = leaves[g // half], g % half
    for g in range(n_gpus):
        net.nic_up.append(net._link(nic.bandwidth_gbs, "nic"))
        net.nic_down.append(net._link(nic.bandwidth_gbs, "nic"))
    net.alive = np.ones(len(net.cap_gbs), dtype=bool)
    return net


def switches_on(path: tuple[int, ...]) -> int:
    """Switches a packet crosses between two NICs joined by `path` (switch-to-switch links)."""
    return len(path) + 1
