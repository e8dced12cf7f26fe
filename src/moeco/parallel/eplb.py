"""Expert-parallel load balancing (EPLB): redundant copies of hot experts, packed onto GPUs.

Notation: L MoE layers, E logical experts per layer in G routing groups of E/G, N nodes, P GPUs
(P/N per node), R physical experts per layer ("replicas", R >= E, R/P slots per GPU). Input: the
recorded load w_LE (tokens routed to each expert). Output, per layer:

    phy2log_LR     logical expert held by physical slot r; slot r lives on GPU r // (R/P),
                   node r // (R/N)
    log2phy_LEX    the physical slots of each logical expert, replica order, padded with -1
    replica_count_LE   c_e >= 1, sum_e c_e = R

A copy routed to expert e goes to one of its c_e replicas, so each replica carries w_e / c_e and
GPU p carries  load_p = sum_{r on p} w_{phy2log[r]} / c_{phy2log[r]}.  The figure of merit is
max_p load_p / mean_p load_p (1 = perfect): every MoE layer waits for its busiest GPU.

Hierarchical policy (G % N == 0), DeepSeek's published heuristic, three greedy steps per layer:

    1. groups -> nodes   pack the G group loads into N nodes, G/N groups each: heaviest group
                         first, to the lightest node that still has room. A group stays whole on
                         one node, so group-limited routing (topk_group groups per token) still
                         reaches at most topk_group nodes.
    2. replicas in node  each node's E/N experts get R/N slots: one each, then repeatedly one more
                         for the expert of largest w_e / c_e (the current heaviest replica).
    3. replicas -> GPUs  pack the node's R/N replicas (weights w_e / c_e) into its P/N GPUs,
                         R/P each, with the rule of step 1.

Global policy (G % N != 0): the same with one group and one node, i.e. replicas chosen over all
E experts and packed over all P GPUs; node locality of groups is given up.

Ties go to the lowest index everywhere, so the plan is deterministic; on DeepSeek's README example
(tests/test_eplb.py) it gives the published phy2log.

Applying a plan (one process): `replicate_experts` copies each logical expert's weights into its
slots (E, ...) -> (R, ...), and `ReplicaDispatcher` wraps any dispatcher: it rewrites each copy's
logical expert into one of its replicas (`choose_replicas`: the i-th copy of expert e on this rank
goes to replica (i + offset) mod c_e) and hands the physical routing to the wrapped dispatcher with
R experts. The gate weights are untouched and replicas hold equal weights, so the output is the
same as without the plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moeco.errors import ConfigError, DataError
from moeco.model.moe import Routing


# ---- planning ---------------------------------------------------------------------------------
def pack_balanced(weight_XM: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's M items into num_packs packs of M/num_packs: (pack id, slot in pack), both (X, M).

    Heaviest item first, into the lightest pack that still has room (lowest id on a tie).
    """
    X, M = weight_XM.shape
    per_pack = M // num_packs
    pack_XM = torch.empty(X, M, dtype=torch.int64)
    slot_XM = torch.empty(X, M, dtype=torch.int64)
    order_XM = weight_XM.sort(dim=1, descending=True, stable=True).indices
    for x, (order, w) in enumerate(zip(order_XM.tolist(), weight_XM.tolist())):
        total, filled = [0.0] * num_packs, [0] * num_packs
        for item in order:
            pack = min((p for p in range(num_packs) if filled[p] < per_pack), key=lambda p: (total[p], p))
            pack_XM[x, item], slot_XM[x, item] = pack, filled[pack]
            total[pack] += w[item]
            filled[pack] += 1
    return pack_XM, slot_XM


def add_replicas(weight_XM: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spread each row's M items over num_slots >= M replicas, minimising the heaviest replica.

    Returns (item of each slot (X, S), its replica rank (X, S), replicas per item (X, M)); slots
    0..M-1 hold the items themselves, the rest are the extra replicas in the order they were added.
    """
    X, M = weight_XM.shape
    item_XS = torch.arange(num_slots).repeat(X, 1)
    rank_XS = torch.zeros(X, num_slots, dtype=torch.int64)
    count_XM = torch.ones(X, M, dtype=torch.int64)
    rows = torch.arange(X)
    for s in range(M, num_slots):
        hottest = (weight_XM / count_XM).argmax(dim=1)  # first maximum on a tie
        item_XS[:, s], rank_XS[:, s] = hottest, count_XM[rows, hottest]
        count_XM[rows, hottest] += 1
    return item_XS, rank_XS, count_XM


def _inverse(perm_XN: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(perm_XN).scatter_(1, perm_XN, torch.arange(perm_XN.shape[1]).expand_as(perm_XN))


def check_layout(num_experts: int, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    """One-line ConfigError for a layout EPLB cannot plan (names the value and the fix)."""
    if min(num_groups, num_nodes, num_gpus) < 1:
        raise ConfigError(f"groups, nodes and GPUs must be >= 1, got {num_groups}, {num_nodes}, {num_gpus}")
    if num_gpus % num_nodes:
        raise ConfigError(f"GPUs = {num_gpus} is not a multiple of nodes = {num_nodes}: give the same GPUs per node")
    if num_replicas < num_experts:
        raise ConfigError(f"replicas = {num_replicas} < {num_experts} experts: every expert needs a slot; "
                          f"use at least {num_experts}")
    if num_replicas % num_gpus:
        raise ConfigError(f"replicas = {num_replicas} is not divisible by {num_gpus} GPUs: every GPU holds the "
                          f"same number of slots; try {-(-num_replicas // num_gpus) * num_gpus}")
    if num_experts % num_groups:
        raise ConfigError(f"groups = {num_groups} does not divide {num_experts} experts: use the model's n_group")


def rebalance(load: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
              policy: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(phy2log_LR, log2phy_LEX, replica_count_LE) for load (L, E) or (E,) (then L = 1).

    policy "auto" is hierarchical when groups divide into nodes (G % N == 0), else global.
    """
    load_LE = load.detach().reshape(-1, load.shape[-1]).to("cpu", torch.float64)
    L, E = load_LE.shape
    check_layout(E, num_replicas, num_groups, num_nodes, num_gpus)
    if policy not in ("auto", "hierarchical", "global"):
        raise ConfigError(f"policy = {policy!r}: choose auto, hierarchical or global")
    if policy == "hierarchical" and num_groups % num_nodes:
        raise ConfigError(f"policy hierarchical needs groups ({num_groups}) to be a multiple of nodes "
                          f"({num_nodes}); use policy global or auto")
    if policy == "global" or num_groups % num_nodes:
        num_groups = num_nodes = 1
    G, N, P, R = num_groups, num_nodes, num_gpus, num_replicas
    group_size, per_node, slots_node, slots_gpu = E // G, E // N, R // N, R // P

    # 1. groups -> nodes; "node-major" position of each expert: node n's experts at [n E/N, (n+1) E/N)
    node_LG, rank_LG = pack_balanced(load_LE.view(L, G, group_size).sum(-1), N)
    first_LG = (node_LG * (G // N) + rank_LG) * group_size
    pos_LE = (first_LG[..., None] + torch.arange(group_size)).view(L, E)
    expert_at_LE = _inverse(pos_LE)  # logical expert at each node-major position

    # 2. replicas within each node (rows = (layer, node))
    w_XM = load_LE.gather(1, expert_at_LE).view(L * N, per_node)
    local_XS, rank_XS, count_XM = add_replicas(w_XM, slots_node)

    # 3. each node's replicas -> its GPUs; slot = GPU in node * R/P + place on the GPU
    per_replica_XS = (w_XM / count_XM).gather(1, local_XS)
    gpu_XS, place_XS = pack_balanced(per_replica_XS, P // N)
    replica_at_XS = _inverse(gpu_XS * slots_gpu + place_XS)  # which replica sits in each slot

    node_major_LR = (local_XS.gather(1, replica_at_XS).view(L, N, slots_node)
                     + (torch.arange(N) * per_node).view(1, N, 1)).view(L, R)
    phy2log_LR = expert_at_LE.gather(1, node_major_LR)
    phy_rank_LR = rank_XS.gather(1, replica_at_XS).view(L, R)
    replica_count_LE = count_XM.view(L, E).gather(1, pos_LE)

    X = int(replica_count_LE.max())
    log2phy_LEX = torch.full((L, E * X), -1, dtype=torch.int64)
    log2phy_LEX.scatter_(1, phy2log_LR * X + phy_rank_LR, torch.arange(R).expand(L, R))
    return phy2log_LR, log2phy_LEX.view(L, E, X), replica_count_LE


def gpu_loads(load_LE: torch.Tensor, phy2log_LR: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """(L, P) load per GPU when each expert's load splits evenly over its replicas (phy2log (L, R)
    or (R,) for every layer)."""
    load_LE = load_LE.reshape(-1, load_LE.shape[-1]).to(torch.float64)
    L, E = load_LE.shape
    phy2log_LR = phy2log_LR.reshape(-1, phy2log_LR.shape[-1]).expand(L, -1)  # one row: the same for all layers
    count_LE = torch.zeros(L, E, dtype=torch.float64).scatter_add_(1, phy2log_LR,
                                                                   torch.ones_like(phy2log_LR, dtype=torch.float64))
    per_slot_LR = (load_LE / count_LE).gather(1, phy2log_LR)
    return per_slot_LR.view(L, num_gpus, -1).sum(-1)


def imbalance(gpu_load_LP: torch.Tensor) -> tuple[list[float], float]:
    """max/mean load per layer, and overall sum_l max_l / sum_l mean_l (time through all layers
    against perfect balance); 1.0 for a layer without load."""
    mx, mean = gpu_load_LP.amax(1), gpu_load_LP.mean(1)
    per_layer = torch.where(mean > 0, mx / mean.clamp(min=1e-30), 1.0).tolist()
    total = float(mx.sum() / mean.sum()) if mean.sum() > 0 else 1.0
    return per_layer, total


@dataclass(frozen=True)
class Placement:
    """A plan for every MoE layer: rows follow `layer_ids` (the model's layer ids, MTP included)."""

    phy2log_LR: torch.Tensor
    log2phy_LEX: torch.Tensor
    replica_count_LE: torch.Tensor
    layer_ids: tuple[str, ...]
    num_nodes: int
    num_gpus: int
    policy: str

    @classmethod
    def plan(cls, load_LE: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
             layer_ids=None, policy: str = "auto") -> Placement:
        load_LE = load_LE.reshape(-1, load_LE.shape[-1])
        used = "global" if policy == "global" or num_groups % num_nodes else "hierarchical"
        tensors = rebalance(load_LE, num_replicas, num_groups, num_nodes, num_gpus, policy)
        ids = tuple(str(i) for i in (layer_ids if layer_ids is not None else range(load_LE.shape[0])))
        return cls(*tensors, ids, num_nodes, num_gpus, used)

    @property
    def slots_per_gpu(self) -> int:
        return self.phy2log_LR.shape[1] // self.num_gpus

    def local_slots(self, layer: int, gpu: int) -> torch.Tensor:
        """Logical experts whose weights GPU `gpu` holds in `layer` (its slots, in order)."""
        s = self.slots_per_gpu
        return self.phy2log_LR[layer, gpu * s:(gpu + 1) * s]


def report(load_LE: torch.Tensor, placement: Placement, layer_ids=None) -> dict:
    """max/mean GPU load per layer and overall, before (expert e on GPU e // (E/P), no replicas;
    None when P does not divide E) and after the placement."""
    load_LE = load_LE.reshape(-1, load_LE.shape[-1]).to(torch.float64)
    L, E = load_LE.shape
    P = placement.num_gpus
    after, after_total = imbalance(gpu_loads(load_LE, placement.phy2log_LR, P))
    before, before_total = [None] * L, None
    if E % P == 0:
        before, before_total = imbalance(gpu_loads(load_LE, torch.arange(E), P))
    ids = layer_ids if layer_ids is not None else placement.layer_ids
    return {"policy": placement.policy, "experts": E, "replicas": placement.phy2log_LR.shape[1],
            "nodes": placement.num_nodes, "gpus": P,
            "layers": [{"layer": str(i), "tokens": float(load_LE[row].sum()), "before": before[row],
                        "after": after[row], "max_replicas": int(placement.replica_count_LE[row].max())}
                       for row, i in enumerate(ids)],
            "before": before_total, "after": after_total}


# ---- applying a placement ---------------------------------------------------------------------
def choose_replicas(indices_TK: torch.Tensor, log2phy_EX: torch.Tensor, replica_count_E: torch.Tensor,
                    offset: int = 0) -> torch.Tensor:
    """Physical expert of every copy (T, K): the i-th copy (token-major order) routed to logical
    expert e goes to replica (i + offset) mod c_e. Deterministic, spreads copies within one, and
    no host sync. An EP rank passes offset = its rank so ranks do not all start on replica 0."""
    flat = indices_TK.flatten()
    order = flat.argsort(stable=True)
    E = replica_count_E.shape[0]
    counts = torch.zeros(E, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    starts = counts.cumsum(0) - counts
    nth = torch.empty_like(flat)
    nth[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    count = replica_count_E.to(flat.device)[flat]
    replica = (nth + offset) % count
    return log2phy_EX.to(flat.device)[flat, replica].view_as(indices_TK)


class ReplicaDispatcher:
    """Wraps a dispatcher so that it sees physical experts: dispatch rewrites each copy's logical
    expert into one of its replicas and calls the wrapped dispatcher with R experts; combine is the
    wrapped one's. The experts it feeds must hold R slots in phy2log order (`replicate_experts`)."""

    def __init__(self, inner, log2phy_EX: torch.Tensor, replica_count_E: torch.Tensor, offset: int = 0):
        self.inner = inner
        self.log2phy_EX, self.replica_count_E, self.offset = log2phy_EX, replica_count_E, offset
        self.num_physical = int(replica_count_E.sum())

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, n_experts: int):
        if n_experts != self.replica_count_E.shape[0]:
            raise ConfigError(f"the placement is for {self.replica_count_E.shape[0]} experts, the layer routes "
                              f"{n_experts}: plan it from this model's trace")
        physical_TK = choose_replicas(routing.indices_TK, self.log2phy_EX, self.replica_count_E, self.offset)
        return self.inner.dispatch(x_TD, Routing(routing.weights_TK, physical_TK, routing.scores_TE),
                                   self.num_physical)

    def combine(self, y_CD: torch.Tensor, handle) -> torch.Tensor:
        return self.inner.combine(y_CD, handle)


@torch.no_grad()
def replicate_experts(experts: nn.Module, phy2log_R: torch.Tensor, num_experts: int) -> nn.Module:
    """Give `experts` one slot per physical expert, in place: every parameter and buffer whose first
    dimension is the expert (size num_experts) becomes tensor[phy2log_R], so replicas are copies.
    For inference: replicas are separate tensors, their gradients are not summed."""
    phy2log_R = phy2log_R.to(torch.int64)
    for name, p in list(experts.named_parameters(recurse=False)):
        if p.dim() and p.shape[0] == num_experts:
            setattr(experts, name, nn.Parameter(p.index_select(0, phy2log_R.to(p.device)), p.requires_grad))
    for name, b in list(experts.named_buffers(recurse=False)):
        if b is not None and b.dim() and b.shape[0] == num_experts:
            experts._buffers[name] = b.index_select(0, phy2log_R.to(b.device))
    return experts


def apply_placement(model: nn.Module, placement: Placement) -> None:
    """Single process: every MoE layer of a moeco Transformer gets its replicated experts and a
    ReplicaDispatcher around its dispatcher. Rows of the placement are matched by layer id."""
    rows = {lid: row for row, lid in enumerate(placement.layer_ids)}
    for layer_id, moe in model.moe_layers():
        if str(layer_id) not in rows:
            raise ConfigError(f"the placement has no row for MoE layer {layer_id} (it has {list(rows)}): "
                              "plan it from a trace of this model")
        row = rows[str(layer_id)]
        replicate_experts(moe.experts, placement.phy2log_LR[row], moe.n_experts)
        moe.dispatcher = ReplicaDispatcher(moe.dispatcher, placement.log2phy_LEX[row],
                                           placement.replica_count_LE[row])


# ---- traces -----------------------------------------------------------------------------------
def read_loads(path: str | Path, last_steps: int | None = None, skip_last: int = 0) -> tuple[list[str], torch.Tensor]:
    """(layer ids, load (L, E) float64) from a recorded trace:

    - a run directory or its metrics.jsonl (`moeco train`): `expert_counts` of each step summed
      (of the last `last_steps` steps when given, leaving out the final `skip_last` steps);
    - a .json of {layer id: [tokens per expert]} or a list of such lists;
    - a .pt holding a (L, E) or (E,) tensor, or a dict {layer id: tensor}.
    """
    p = Path(path)
    if p.is_dir() and (p / "metrics.jsonl").is_file():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise DataError(f"trace {str(path)!r} not found: give a run directory, its metrics.jsonl, or a .json/.pt "
                        "of per-layer expert loads")
    if p.suffix == ".jsonl":
        records = [r for r in _jsonl(p) if r.get("expert_counts")]
        if not records:
            raise DataError(f"{str(p)!r} has no step with expert_counts: record a trace with this version's "
                            "`moeco train`")
        if skip_last >= len(records):
            raise DataError(f"{str(p)!r} has {len(records)} steps with expert_counts, too few to hold out "
                            f"{skip_last}: hold out fewer")
        records = records[:len(records) - skip_last]
        records = records[-last_steps:] if last_steps else records
        ids = list(records[-1]["expert_counts"])
        try:
            rows = [torch.stack([torch.as_tensor(r["expert_counts"][i], dtype=torch.float64)
                                 for r in records if i in r["expert_counts"]]).sum(0) for i in ids]
        except (TypeError, ValueError, RuntimeError) as e:
            raise DataError(f"{str(p)!r}: steps with different expert counts per layer ({e})") from None
        return ids, _as_LE(rows, p)
    if skip_last:
        raise DataError(f"trace {str(p)!r} has no steps to hold out: --holdout needs a metrics.jsonl")
    if p.suffix == ".pt":
        data = torch.load(p, map_location="cpu", weights_only=True)
    else:
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"trace {str(p)!r} is not JSON ({e}): give metrics.jsonl, a .json or a .pt") from None
    if isinstance(data, dict):
        return [str(k) for k in data], _as_LE([data[k] for k in data], p)
    rows = _as_LE(data, p)
    return [str(i) for i in range(rows.shape[0])], rows


def _jsonl(p: Path):
    for line in p.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue


def _as_LE(rows, p: Path) -> torch.Tensor:
    try:
        if isinstance(rows, list) and rows and not isinstance(rows[0], (int, float)):
            t = torch.stack([torch.as_tensor(r, dtype=torch.float64) for r in rows])
        else:
            t = torch.as_tensor(rows, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"trace {str(p)!r}: layers of unequal or non-numeric loads ({e})") from None
    t = t.reshape(1, -1) if t.dim() == 1 else t
    if t.dim() != 2 or t.numel() == 0 or (t < 0).any() or not torch.isfinite(t).all():
        raise DataError(f"trace {str(p)!r}: expected non-negative loads of shape (layers, experts), "
                        f"got shape {tuple(t.shape)}")
    return t
