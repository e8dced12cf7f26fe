"""Load balancing of the routed experts, as DeepSeek-V3 trains it (TR section 2.1.2).

Auxiliary-loss-free balancing (Eq. 16). Every router keeps `tokens_per_expert` (E,), to which
its forward adds the step's routed-token counts, and `e_score_correction_bias` b (E,), used only to
select experts (`topk(s + b)`), never to weight them. After each optimizer step:

    load_e  = tokens_per_expert summed over micro-steps and data-parallel ranks
    b_e    -= gamma * sign(load_e - mean(load))     # overloaded: -gamma, underloaded: +gamma
    counts  = 0

Sequence-wise balance loss (Eqs. 17-20), for one sequence of T tokens, N_r experts, top K_r:

    f_i    = N_r / (K_r T) * sum_t 1[i in topk_t]
    P_i    = 1/T * sum_t s_it / sum_j s_jt
    L_Bal  = alpha * sum_i f_i P_i              (the model returns sum_i f_i P_i; the trainer adds alpha)

gamma for a run of S steps (`train.bias_update_speed = "auto"`): the bias must be able to cross the
spread of the sigmoid scores (about 1) several times within the run, or the routers of a short run
on user data collapse onto a few experts before the bias catches up; long runs keep DeepSeek-V3's 0.001:

    gamma = clamp(3 / S, 0.001, 0.01)        (300 steps: 0.01; 3,000 or more: 0.001)

`ImbalanceWatch` warns once when max/mean load stays above IMBALANCE_WARN_RATIO for
IMBALANCE_WARN_STEPS steps in a row, naming the knobs that fix it.

`sequence_balance_loss` is the plain reference of that formula, used by the tests to check the
model's value. `BalanceHook` is the per-step update above plus the statistics the metrics log.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

IMBALANCE_WARN_RATIO = 2.0
IMBALANCE_WARN_STEPS = 50
log = logging.getLogger(__name__)


def auto_gamma(steps: int) -> float:
    """The bias update speed for a run of `steps` optimizer steps (see the module docstring)."""
    return min(0.01, max(0.001, 3.0 / max(steps, 1)))


def sequence_balance_loss(scores_BTE: torch.Tensor, topk_BTK: torch.Tensor) -> torch.Tensor:
    """sum_i f_i P_i averaged over the B sequences; scores are the routing affinities s (no bias)."""
    B, T, E = scores_BTE.shape
    K = topk_BTK.shape[-1]
    chosen_BE = torch.zeros(B, E, dtype=scores_BTE.dtype, device=scores_BTE.device)
    chosen_BE.scatter_add_(1, topk_BTK.reshape(B, T * K), torch.ones_like(topk_BTK.reshape(B, T * K),
                                                                            dtype=scores_BTE.dtype))
    f_BE = chosen_BE * E / (K * T)
    P_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(1)
    return (f_BE * P_BE).sum(-1).mean()


def routers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer id, router) for every MoE layer of a moeco Transformer (unwrapped)."""
    return [(layer_id, moe.gate) for layer_id, moe in model.moe_layers()]


class BalanceHook:
    """Moves each router's selection bias from the expert loads counted during the step."""

    def __init__(self, model: nn.Module, gamma: float, group: dist.ProcessGroup | None = None) -> None:
        self.routers = routers(model)
        self.gamma = gamma
        self.group = group
        self.last_stats: dict[str, float] = {}
        self.last_counts: dict[str, list[int]] = {}

    @torch.no_grad()
    def gather_loads(self) -> torch.Tensor:
        """(layers, E) float32 token counts of this step, summed over data-parallel ranks."""
        if not self.routers:
            return torch.zeros(0, 0)
        loads_LE = torch.stack([gate.tokens_per_expert.float() for _, gate in self.routers])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(loads_LE, group=self.group)
        return loads_LE

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Call after `optimizer.step()`: update the biases, zero the counts, return load statistics."""
        loads_LE = self.gather_loads()
        if not self.routers:
            self.last_stats = {}
            return {}
        mean_L1 = loads_LE.mean(dim=1, keepdim=True)
        sign_LE = torch.sign(loads_LE - mean_L1)  # all zero for a layer that saw no tokens
        for row, (_, gate) in enumerate(self.routers):
            bias = gate.e_score_correction_bias
            if self.gamma > 0 and bias is not None:
                bias -= (self.gamma * sign_LE[row]).to(bias.dtype, copy=False).to(bias.device)
            gate.tokens_per_expert.zero_()
        ratio_L = torch.where(mean_L1[:, 0] > 0, loads_LE.amax(dim=1) / mean_L1[:, 0].clamp(min=1e-30), 0.0)
        stats = {str(layer_id): r for (layer_id, _), r in zip(self.routers, ratio_L.tolist())}  # host sync
        self.last_stats = stats
        # tokens per expert of this step, the trace EPLB plans from (moeco.parallel.eplb.read_loads)
        self.last_counts = {str(layer_id): row for (layer_id, _), row in
                            zip(self.routers, loads_LE.round().to(torch.int64).tolist())}
        return stats

    @torch.no_grad()
    def discard_counts(self) -> None:
        """Forget counts from forwards that are not training steps (validation, sampling)."""
        for _, gate in self.routers:
            gate.tokens_per_expert.zero_()


class ImbalanceWatch:
    """Warns once when the most loaded expert stays above IMBALANCE_WARN_RATIO x the mean load."""

    def __init__(self, gamma: float, ratio: float = IMBALANCE_WARN_RATIO, steps: int = IMBALANCE_WARN_STEPS) -> None:
        self.gamma, self.ratio, self.steps = gamma, ratio, steps
        self.streak, self.warned = 0, False

    def update(self, record: dict) -> str | None:
        """After each step; returns the warning when it is given."""
        loads = record.get("expert_load") or {}
        worst = max(loads.items(), key=lambda kv: kv[1], default=None)
        self.streak = self.streak + 1 if worst is not None and worst[1] > self.ratio else 0
        if self.warned or self.streak < self.steps:
            return None
        self.warned = True
        text = (f"warning: expert load max/mean has stayed above {self.ratio:g} for {self.steps} steps (layer "
                f"{worst[0]}: {worst[1]:.2f} at step {record['step']}); the routers are collapsing onto a few "
                f"experts: raise train.bias_update_speed (now {self.gamma:g}) or model.aux_loss_alpha")
        log.warning(text)
        return text
