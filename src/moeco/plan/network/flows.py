"""Flow-level simulation: max-min fair sharing of link bandwidth, and when a set of flows completes.

Notation. L directed links with capacity c_l (GB/s, one direction); F flows. A flow may be split
over several paths (adaptive routing sprays it), so flow f puts a fraction a_lf of its rate on
link l (a_lf = 1 on every link of a single path). Stored sparse as three arrays of length nnz:
link[i], flow[i], coef[i] (= a_lf). Sizes in bytes, rates in GB/s, so bytes / rate is in ns.

Max-min fairness (the standard flow-level model of TCP/RDMA congestion control at steady state):
rates r such that no flow can go faster without slowing one that is no faster. Progressive
filling computes it exactly:

    r = 0; every flow unfrozen
    repeat until every flow is frozen:
        n_l  = sum of a_lf over unfrozen f                  (how fast link l fills per unit of rate)
        t    = min over links with n_l > 0 of (c_l - sum_f a_lf r_f) / n_l
        r_f += t for every unfrozen f                        (all unfrozen flows grow together)
        freeze every flow that crosses a link now full
    Textbook check: links A, B of capacity 1; f1 on A and B, f2 on A, f3 on B -> 1/2, 1/2, 1/2;
    with B of capacity 2 -> f1 = f2 = 1/2 (A is the bottleneck), f3 = 3/2.

Completion (flow-level, event driven): all flows start together; compute max-min rates; advance to
the first flow's completion; drop it; recompute; repeat. The collective's bandwidth term is the time
the last flow finishes. Every step is a few numpy bincounts over nnz entries, so an all-to-all of
128 GPUs (16k flows) takes well under a second. Rates do not depend on sizes, and scaling every
size by s scales every completion time by s: one run gives the bandwidth term at every message size.

Cost and a shortcut. Each event removes one rate level and each max-min solve walks every level,
so the exact simulation is quadratic in the number of distinct rates: ECMP all-to-all on 64 GPUs
(8k flows, ~170 levels) takes ~15 s. The time the last flow finishes can never beat the busiest
link, max_l (bytes on l) / c_l; in every case compared (all-to-all and ring all-gather on ft2 with
ECMP, 32-128 GPUs, several seeds; `tests/test_plan_network.py` keeps one) the event-driven time
equalled that bound to 1e-15, because the busiest link is its own flows' bottleneck and stays
full until they finish. Above `EVENT_FLOWS` flows `complete` therefore returns the bound directly
and says so (events = 0); below it, it runs the events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-9
EVENT_FLOWS = 3000  # above this many flows, `complete` uses the busiest-link bound


@dataclass
class FlowSet:
    """Flows as a sparse link x flow matrix: entry i puts coef[i] of flow[i]'s rate on link[i]."""

    link: np.ndarray  # [nnz] int
    flow: np.ndarray  # [nnz] int
    coef: np.ndarray  # [nnz] float
    size: np.ndarray  # [F] bytes

    @property
    def n_flows(self) -> int:
        return len(self.size)


def max_min_rates(cap: np.ndarray, fs: FlowSet, active: np.ndarray | None = None) -> np.ndarray:
    """Max-min fair rate of every flow (0 for inactive ones); cap [L] in GB/s."""
    n_links, n_flows = len(cap), fs.n_flows
    active = np.ones(n_flows, dtype=bool) if active is None else active.copy()
    rate = np.zeros(n_flows)
    used = np.zeros(n_links)
    frozen = ~active
    while not frozen.all():
        grow = ~frozen
        n = np.bincount(fs.link, weights=fs.coef * grow[fs.flow], minlength=n_links)
        loaded = n > EPS
        if not loaded.any():
            raise ValueError("a flow crosses no link: it has no finite max-min rate")
        t = np.min((cap[loaded] - used[loaded]) / n[loaded])
        t = max(t, 0.0)
        rate[grow] += t
        used += t * n
        full = loaded & (used >= cap * (1 - 1e-9))
        hit = np.bincount(fs.flow, weights=(full[fs.link] & (fs.coef > EPS)).astype(float), minlength=n_flows) > 0
        newly = hit & grow
        if not newly.any():  # numerical guard: freeze the flows of the tightest link
            newly = grow & (np.bincount(fs.flow, weights=(loaded[fs.link]).astype(float), minlength=n_flows) > 0)
        frozen |= newly
    return rate


@dataclass
class Completion:
    time_ns: float  # when the last flow finishes
    link_bytes: np.ndarray  # [L] bytes each link carried
    events: int

    def max_utilization(self, cap: np.ndarray) -> float:
        """Busiest link's bytes over what it could carry in the whole time (0..1)."""
        if self.time_ns <= 0:
            return 0.0
        return float(np.max(self.link_bytes / (cap * self.time_ns)))


def complete(cap: np.ndarray, fs: FlowSet, max_event_flows: int = EVENT_FLOWS, batch_tol: float = 1e-6) -> Completion:
    """Run every flow to completion under max-min sharing; flows start together.

    Up to `max_event_flows` flows: the event-driven simulation (flows finishing within `batch_tol`
    of the first retire together). Above it: the busiest link's bytes / capacity, the lower bound
    that the event-driven time reached in every case compared (see the header).
    """
    link_bytes = np.bincount(fs.link, weights=fs.coef * fs.size[fs.flow], minlength=len(cap))
    if fs.n_flows > max_event_flows:
        return Completion(float(np.max(link_bytes / cap)), link_bytes, 0)
    remaining = fs.size.astype(float).copy()
    active = remaining > 0
    t = 0.0
    events = 0
    link, flow, coef = fs.link, fs.flow, fs.coef
    while active.any():
        keep = active[flow]  # compress to the active flows' entries
        sub = FlowSet(link[keep], flow[keep], coef[keep], fs.size)
        rate = max_min_rates(cap, sub, active)
        finish = np.where(active, remaining / np.maximum(rate, EPS), np.inf)
        first = float(finish.min())
        done = active & (finish <= first * (1 + batch_tol))
        dt = float(finish[done].max())
        remaining = np.where(active, remaining - rate * dt, 0.0)
        active &= ~done & (remaining > fs.size * 1e-9)
        t += dt
        events += 1
    return Completion(t, link_bytes, events)


def flowset_from_paths(flows: list[list[tuple[tuple[int, ...], float]]], sizes: list[float]) -> FlowSet:
    """flows[f] = [(link ids of one path, fraction of f on it), ...] -> FlowSet."""
    link, flow, coef = [], [], []
    for f, paths in enumerate(flows):
        for links, frac in paths:
            for x in links:
                link.append(x)
                flow.append(f)
                coef.append(frac)
    # one entry per (link, flow): a link shared by two paths of the same flow gets their sum
    key = np.asarray(flow, dtype=np.int64) * (max(link, default=0) + 1) + np.asarray(link, dtype=np.int64)
    uniq, inv = np.unique(key, return_inverse=True)
    width = max(link, default=0) + 1
    summed = np.bincount(inv, weights=np.asarray(coef, dtype=float), minlength=len(uniq))
    return FlowSet((uniq % width).astype(np.int64), (uniq // width).astype(np.int64), summed,
                   np.asarray(sizes, dtype=float))
