"""Latency model: a per-message overhead plus a per-switch-hop latency, fitted to ISCA Table 5.

Table 5 gives the CPU-side end-to-end latency of a 64 B transfer: on one leaf the message crosses
1 switch, across leaves 3 (leaf, spine, leaf). Two measurements, two unknowns:

    latency(s switches) = o + h s          h = (cross - same) / 2,  o = same - h
    InfiniBand  2.8 / 3.7 us  ->  h = 0.45 us, o = 2.35 us
    RoCE        3.6 / 5.6 us  ->  h = 1.00 us, o = 2.60 us
    NVLink      3.33 us inside a node (one NVSwitch hop), taken as it is

So the model returns Table 5's four network values exactly (they are its inputs) and extrapolates
to 5 switches (ft3 across pods: IB 4.6, RoCE 7.6 us). A transfer that is forwarded over NVLink
inside a node before or after the NIC (NCCL's PXN, DeepEP's forwarding, rerouting around a failed
NIC) adds the NVLink latency once per forwarding hop, a conservative choice: the forwarding GPU
pipelines chunks, so for large messages only the first chunk pays it. The time of one step of a
collective is latency + bytes / bandwidth (the alpha-beta model), the bandwidth term from the
flow-level simulation.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeco.errors import ConfigError
from moeco.plan.hardware import Link


@dataclass(frozen=True)
class LatencyModel:
    overhead_us: float  # o: per message, NIC and software, both ends
    per_switch_us: float  # h: per switch crossed
    nvlink_us: float  # one forwarding hop inside a node

    def network_us(self, switches: int) -> float:
        return self.overhead_us + self.per_switch_us * switches

    def path_us(self, switches: int, nvlink_hops: int) -> float:
        """A NIC-to-NIC path through `switches`, plus NVLink forwarding hops; switches = 0: NVLink only."""
        if switches == 0:
            return self.nvlink_us * max(nvlink_hops, 1)
        return self.network_us(switches) + self.nvlink_us * nvlink_hops


def latency_model(nic: Link, nvlink: Link) -> LatencyModel:
    if nic.latency_us is None or nic.latency_cross_leaf_us is None:
        raise ConfigError(f"link {nic.name!r} has no latency_us / latency_cross_leaf_us; add both to its "
                          "[link.NAME] entry in --hardware FILE.toml (64 B latency on one leaf / across leaves)")
    if nic.latency_cross_leaf_us < nic.latency_us:
        raise ConfigError(f"link {nic.name!r}: latency_cross_leaf_us = {nic.latency_cross_leaf_us} is below "
                          f"latency_us = {nic.latency_us}; crossing leaves cannot be faster")
    h = (nic.latency_cross_leaf_us - nic.latency_us) / 2
    return LatencyModel(nic.latency_us - h, h, nvlink.latency_us or 3.33)
