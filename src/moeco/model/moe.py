"""DeepSeekMoE: fine-grained routed experts plus shared experts, run as named stages.

    y = sum_shared FFN_s(x) + sum_{i in TopK} g_i FFN_i(x)

Router (float32, as DeepSeek keeps it):
    s      = sigmoid(x W_g^T)  (V3)   or softmax(x W_g^T)  (V2)          (T, E)
    choice = s + b             b = e_score_correction_bias, used for *selection only* (noaux_tc)
    groups: the E experts form n_group contiguous groups (one node each in V3's training layout);
            a group scores the sum of its top-2 `choice` values (noaux_tc) or its max
            (group_limited_greedy); only the best `topk_group` groups stay, the others are
            masked to -inf (as DeepSeek's own code does); greedy ignores groups.
    idx    = topk(choice, K)                       within the kept groups
    g      = s[idx] (/ sum s[idx] if norm_topk_prob) * routed_scaling_factor

Stages: route -> dispatch -> experts -> combine. The MoE is given a dispatcher (the `Dispatcher`
protocol): `dispatch` returns the token copies sorted by local expert, the per-expert counts and a
handle; `combine(y, handle)` needs nothing but the handle to return each token's weighted sum.
`LocalDispatcher` does it in one process and is the reference; moeco.parallel's all-to-all
dispatchers implement the same protocol, so the model never calls torch.distributed.

Balance bookkeeping: in training mode the router adds each forward's routed-token counts to its `tokens_per_expert`
buffer; the trainer reads them to move the bias (aux-loss-free balancing) and then zeroes them.
The sequence-wise balance term  L = sum_i f_i P_i  with  f_i = E/(K S) * #{t: i in TopK_t}  and
P_i = mean_t s_i,t / sum_j s_j,t  is returned when asked for (the trainer multiplies by alpha).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moeco.config import ModelConfig
from moeco.model.layers import MLP


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert, (E,) int64. Unlike torch.bincount, no host sync on CUDA
    (bincount reads the maximum back to size its output: two stalls per MoE layer)."""
    flat = indices.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


@dataclass
class Routing:
    weights_TK: torch.Tensor  # float32 gate values g
    indices_TK: torch.Tensor  # chosen expert ids
    scores_TE: torch.Tensor  # s, float32, before bias


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.topk_method, self.scoring_func = c.topk_method, c.scoring_func
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size, dtype=torch.float32))
        if c.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.register_buffer("tokens_per_expert", torch.zeros(c.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def _apply(self, fn, recurse=True):
        # The router stays float32 whatever dtype the model is cast to (HF keeps it so too).
        super()._apply(fn, recurse)
        for name in ("weight", "e_score_correction_bias", "tokens_per_expert"):
            t = getattr(self, name)
            if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        return self

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits = F.linear(x_TD.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(group_mask[..., None], float("-inf")).view(-1, self.n_experts)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:  # with one expert too: its weight becomes 1 (DeepSeek's reference does so)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        if self.training:  # loads for the balance hook; inference leaves the counts alone
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(indices, self.n_experts).float()
        return Routing(weights, indices, scores)


def sequence_balance_loss(routing: Routing, batch: int, n_experts: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance term sum_i f_i P_i, averaged over sequences."""
    T, K = routing.indices_TK.shape
    S = T // batch
    counts = torch.zeros(batch, n_experts, device=routing.indices_TK.device)
    counts.scatter_add_(1, routing.indices_TK.view(batch, S * K),
                        torch.ones(batch, S * K, device=counts.device))
    f = counts * (n_experts / (K * S))
    s = routing.scores_TE.view(batch, S, n_experts)
    p = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (f * p).sum(dim=-1).mean()


class _GatherRows(torch.autograd.Function):
    """out = x[index], whose backward is a gather too: grad_x = grad[back_index] summed over `fold` rows.

    Valid when `index` sends every row of x to exactly `fold` output rows, found at
    back_index[r * fold : (r + 1) * fold] for row r. Dispatch (each token copied K times) and the
    inverse permutation in combine are of this kind; autograd's own backward for x[index] is an
    atomic or sort-based scatter, several times slower on a GPU.
    """

    @staticmethod
    def forward(ctx, x, index, back_index, fold):
        ctx.save_for_backward(back_index)
        ctx.fold = fold
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (back_index,) = ctx.saved_tensors
        g = grad.index_select(0, back_index)
        if ctx.fold > 1:
            g = g.view(-1, ctx.fold, *g.shape[1:]).sum(dim=1)
        return g, None, None, None


class Dispatcher(Protocol):
    def dispatch(self, x_TD: torch.Tensor, routing: Routing, n_experts: int
                 ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(copies x_CD sorted by local expert, tokens_per_expert (E_local,), handle)."""
        ...

    def combine(self, y_CD: torch.Tensor, handle: Any) -> torch.Tensor:
        """y_TD: each token's K expert outputs summed with its gate weights."""
        ...


@dataclass
class LocalHandle:
    order: torch.Tensor  # (T*K,) copy c (sorted by expert) is (token, slot) = divmod(order[c], K)
    inverse: torch.Tensor  # (T*K,) where (token, slot) went among the copies
    weights_TK: torch.Tensor
    num_tokens: int


def weighted_combine(y_CD: torch.Tensor, weights_TK: torch.Tensor, order: torch.Tensor,
                     inverse: torch.Tensor) -> torch.Tensor:
    """y_TD[t] = sum_k w[t, k] * y_CD[inverse[t*K + k]], with `order` its inverse permutation.

    Any dispatcher that ends with a token's K copies in one tensor calls this; on CUDA it is one
    gather-and-weighted-sum kernel each way (moe_kernels) instead of three passes and two (T, K, D)
    copies.
    """
    if y_CD.is_cuda and not torch.compiler.is_compiling():
        from moeco.model import moe_kernels

        if moe_kernels.available(y_CD.device):
            return moe_kernels.fused(y_CD, weights_TK, order, inverse)
    T, K = weights_TK.shape
    y_TKD = _GatherRows.apply(y_CD, inverse, order, 1).view(T, K, y_CD.shape[-1])
    # Weighted sum over the K copies, element-wise (memory-bound; torch.compile fuses it): a
    # batched (1 x K) @ (K x D) product took 2.3 ms per layer on the H200 in a slow wmma kernel.
    return (y_TKD * weights_TK.to(y_CD.dtype).unsqueeze(-1)).sum(dim=1)


class LocalDispatcher:
    """Single-process dispatch: sort token copies by expert; combine gathers them back and sums, weighted.

    Both directions are row gathers (see _GatherRows), deterministic and free of atomics and of
    host syncs.
    """

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, n_experts: int):
        T, K = routing.indices_TK.shape
        flat = routing.indices_TK.flatten()
        order = flat.argsort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        tokens_per_expert = expert_counts(flat, n_experts)
        x_CD = _GatherRows.apply(x_TD, order // K, inverse, K)
        return x_CD, tokens_per_expert, LocalHandle(order, inverse, routing.weights_TK, T)

    def combine(self, y_CD: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        return weighted_combine(y_CD, handle.weights_TK, handle.order, handle.inverse)


def mix_seed(seed: int, index: int) -> int:
    """A generator seed for item `index` under `seed` (SplitMix64's finalizer: neighbours decorrelated)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class GroupedExperts(nn.Module):
    """E SwiGLU experts as 3-D weights, two grouped GEMMs per forward.

    An expert-parallel rank holds a contiguous range of the layer's experts: local expert e is the
    layer's expert first_expert + e (checkpoint names use the layer's ids).

    w13_E2FD (E, 2F, D): each expert's gate rows [0, F) then up rows [F, 2F), one GEMM for both
    (transformers 5 fuses them the same way, as `gate_up_proj`); w2_EDF (E, D, F): the down projection.
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, recipe, first_expert: int = 0):
        super().__init__()
        self.first_expert = first_expert  # holds experts [first_expert, first_expert + n_experts) of the layer
        self.w13_E2FD = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.w2_EDF = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.grouped_mm = recipe.grouped_mm
        # recipe.grouped_mm_fp8(x, xq, xs, w, offs): the first GEMM on input already quantized 1x128
        self.grouped_mm_fp8 = getattr(recipe, "grouped_mm_fp8", None)

    @torch.no_grad()
    def reset_parameters(self, std: float, seed: int) -> None:
        """N(0, std), each expert from its own generator seeded by (seed, the expert's index in the
        layer): a rank holding experts [first, first + n) draws exactly the values the whole layer
        would, so an expert-parallel run starts from the single-process weights without ever building
        the whole layer."""
        dev = self.w13_E2FD.device
        for j in range(self.w13_E2FD.shape[0]):
            gen = torch.Generator(device=dev).manual_seed(mix_seed(seed, self.first_expert + j))
            self.w13_E2FD[j].normal_(0.0, std, generator=gen)
            self.w2_EDF[j].normal_(0.0, std, generator=gen)

    def forward(self, x_CD: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offs = tokens_per_expert.cumsum(0).to(torch.int32)
        gate, up = self.grouped_mm(x_CD, self.w13_E2FD, offs).chunk(2, dim=-1)
        return self.grouped_mm(F.silu(gate) * up, self.w2_EDF, offs)

    def forward_fp8(self, xq_CD: torch.Tensor, xs_CB: torch.Tensor, tokens_per_expert: torch.Tensor,
                    x_CD: torch.Tensor | None = None) -> torch.Tensor:
        """The experts on input already quantized 1x128 (E4M3 xq, float32 scales xs: an FP8 dispatch payload).

        An FP8 recipe feeds (xq, xs) to its first grouped GEMM as they are (no re-quantization); a
        high-precision recipe runs on the dequantized values. x_CD: those dequantized values as a
        tensor that carries the gradient back to the dispatcher (None: dequantized here, no input grad).
        """
        if x_CD is None:
            D = xq_CD.shape[-1]
            x_CD = (xq_CD.float() * xs_CB.float().repeat_interleave(128, dim=-1)[..., :D])
        offs = tokens_per_expert.cumsum(0).to(torch.int32)
        if self.grouped_mm_fp8 is not None:
            h = self.grouped_mm_fp8(x_CD, xq_CD, xs_CB, self.w13_E2FD, offs)
        else:
            h = self.grouped_mm(x_CD, self.w13_E2FD, offs)
        gate, up = h.chunk(2, dim=-1)
        return self.grouped_mm(F.silu(gate) * up, self.w2_EDF, offs)

    def forward_reference(self, x_CD: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Per-expert loop in plain PyTorch: the reference the grouped path is tested against."""
        out, start = x_CD.new_empty(x_CD.shape), 0
        F_ = self.w2_EDF.shape[-1]
        for e, n in enumerate(tokens_per_expert.tolist()):
            x = x_CD[start:start + n]
            w_gate, w_up = self.w13_E2FD[e, :F_], self.w13_E2FD[e, F_:]
            h = F.silu(x @ w_gate.t()) * (x @ w_up.t())
            out[start:start + n] = h @ self.w2_EDF[e].t()
            start += n
        return out


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, recipe, dispatcher: Dispatcher | None = None):
        super().__init__()
        c = config
        self.n_experts = c.n_routed_experts
        self.gate = Router(c)
        make_experts = getattr(recipe, "make_experts", None)  # e.g. FP8 inference keeps FP8 expert weights
        self.experts = (make_experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size) if make_experts
                        else GroupedExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, recipe))
        self.shared_experts = (MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, recipe,
                                   role="shared_expert") if c.n_shared_experts else None)
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher()

    # The four stages, so a scheduler (or an expert-parallel dispatcher) can interleave them.
    def route(self, x_TD: torch.Tensor) -> Routing:
        return self.gate(x_TD)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        return self.dispatcher.dispatch(x_TD, routing, self.n_experts)

    def run_experts(self, x_CD: torch.Tensor, tokens_per_expert: torch.Tensor, x_fp8=None) -> torch.Tensor:
        """x_fp8: (q, scales) when the dispatcher delivered the copies already quantized 1x128."""
        if x_fp8 is not None and hasattr(self.experts, "forward_fp8"):
            return self.experts.forward_fp8(*x_fp8, tokens_per_expert, x_CD)
        return self.experts(x_CD, tokens_per_expert)

    def combine(self, y_CD: torch.Tensor, handle) -> torch.Tensor:
        return self.dispatcher.combine(y_CD, handle)

    def forward(self, x_BSD: torch.Tensor, return_aux: bool = False):
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        routing = self.route(x_TD)
        x_CD, tokens_per_expert, handle = self.dispatch(x_TD, routing)
        y_CD = self.run_experts(x_CD, tokens_per_expert, getattr(handle, "x_fp8", None))
        y_TD = self.combine(y_CD, handle)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        y = y_TD.view(B, S, D)
        if return_aux:
            return y, sequence_balance_loss(routing, B, self.n_experts)
        return y
