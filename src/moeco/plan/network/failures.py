"""Failures: a link, a switch or a whole plane goes down; the routing layer reroutes around it.

    link      one leaf-to-spine cable (both directions): the first uplink of GPU 0's leaf. Where the
              network has no spine in use (every plane one leaf), GPU 0's NIC cable instead.
    switch    the first spine above GPU 0's leaf (ft3: its first aggregation switch); where there is
              no spine in use, GPU 0's leaf itself.
    plane:K   mpft: every switch and NIC cable of plane K; mrft: the leaves of rail K (its NIC
              cables); planes are what mpft isolates faults into. ft2/ft3 have no planes.

Rerouting (paths.py): equal-cost paths through dead links are dropped; a transfer whose NIC or
leaf is down enters or leaves the network through another NIC of the same node, reached over NVLink
(in mpft: another plane, the same at both ends), as NCCL does when a NIC fails. What a failure
costs is `bandwidth_kept` = bus bandwidth with the failure / without it.
"""

from __future__ import annotations

from dataclasses import replace

from moeco.errors import ConfigError
from moeco.plan.network.graph import Network


def _kill_switch(net: Network, s: int) -> None:
    for (a, b), x in net.edge.items():
        if s in (a, b):
            net.alive[x] = False
    for g, leaf in enumerate(net.leaf_of):
        if leaf == s:
            net.alive[net.nic_up[g]] = net.alive[net.nic_down[g]] = False


def apply_failure(net: Network, spec: str | None) -> tuple[Network, str]:
    """A copy of `net` with the failure applied, and a one-line description of what failed."""
    if spec in (None, "", "none"):
        return net, "none"
    out = replace(net, alive=net.alive.copy(), _paths={})
    leaf0 = net.leaf_of[0]
    ups = net.ups[leaf0]
    if spec == "link":
        if ups:
            up = ups[0]
            out.alive[net.edge[leaf0, up]] = out.alive[net.edge[up, leaf0]] = False
            return out, f"cable leaf {leaf0} - switch {up} (GPU 0's leaf, first uplink)"
        out.alive[net.nic_up[0]] = out.alive[net.nic_down[0]] = False
        return out, "GPU 0's NIC cable (no spine in use)"
    if spec == "switch":
        if ups:
            _kill_switch(out, ups[0])
            return out, f"switch {ups[0]} (first {'spine' if net.topology != 'ft3' else 'aggregation'} above GPU 0)"
        _kill_switch(out, leaf0)
        return out, f"leaf {leaf0} (GPU 0's leaf; no spine in use)"
    if spec.startswith("plane:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = -1
        if net.topology not in ("mpft", "mrft"):
            raise ConfigError(f"--fail {spec} is invalid for {net.topology}: planes exist in mpft (rails in mrft); "
                              "use --fail link or switch")
        if not 0 <= k < net.gpus_per_node:
            raise ConfigError(f"--fail {spec} is invalid: planes are 0..{net.gpus_per_node - 1}")
        leaves = {net.leaf_of[net.gpu(n, k)] for n in range(net.nodes)}
        for s in leaves:
            _kill_switch(out, s)
        spines = [s for s, p in net.plane_of_switch.items() if p == k and s not in leaves] \
            if net.topology == "mpft" else []
        for s in spines:
            _kill_switch(out, s)
        what = f"{len(leaves)} leaf switch{'es' if len(leaves) > 1 else ''}"
        what += f" and {len(spines)} spines" if spines else ""
        return out, f"{'plane' if net.topology == 'mpft' else 'rail'} {k} ({what})"
    raise ConfigError(f"--fail = {spec!r} is invalid: use link, switch or plane:K")
