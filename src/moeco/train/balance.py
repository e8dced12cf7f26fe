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

`sequence_balance_loss` is the plain reference of that formula, used by the tests to check the
model's value. `BalanceHook` is the per-step update above plus the statistics the metrics log.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


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
