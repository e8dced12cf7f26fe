"""AdamW with BF16 moments over FP32 master weights, as DeepSeek-V3 trains (report, section 3.3).

Per parameter p (FP32), gradient g, moments m and v stored in BF16, step t:

    p <- p * (1 - lr * wd)
    m <- m + (1 - b1) * (g - m)              v <- b2 * v + (1 - b2) * g^2
    p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

computed in FP32 and rounded to BF16 only when m and v are stored: the optimizer state shrinks from
8 to 4 bytes per parameter and one step moves 20 instead of 28 bytes per parameter. On CUDA one
Triton kernel per parameter does it in a single pass; elsewhere (and as the reference the kernel is
tested against) the same arithmetic in PyTorch.

`capturable=True` (as in torch.optim) keeps each `step` as a device tensor and takes `lr` as a
device tensor too, so that a CUDA graph can hold the whole optimizer step: the three per-step
scalars (1 - lr wd, lr / (1 - b1^t), sqrt(1 - b2^t)) are computed on the device, in float64 like
the host path, and the kernel reads them from memory instead of from its arguments.
"""

from __future__ import annotations

import math

import torch

from moeco import triton_support

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is an optional (test/GPU) dependency
    _HAVE_TRITON = False

MOMENT_DTYPE = torch.bfloat16

if _HAVE_TRITON:

    @triton.jit
    def _adamw_bf16_moments_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, decay, beta1, beta2, step_size, bc2_sqrt, eps,
                                   h_ptr, BLOCK: tl.constexpr, HYPER_FROM_PTR: tl.constexpr):
        if HYPER_FROM_PTR:  # capturable: (decay, step_size, bc2_sqrt) live in device memory
            decay = tl.load(h_ptr)
            step_size = tl.load(h_ptr + 1)
            bc2_sqrt = tl.load(h_ptr + 2)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = p * decay
        m = m + (1.0 - beta1) * (g - m)
        v = v * beta2 + (1.0 - beta2) * (g * g)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - step_size * tl.div_rn(m, denom)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


def _use_triton(p: torch.Tensor, g: torch.Tensor) -> bool:
    if not _HAVE_TRITON or not p.is_contiguous() or not g.is_contiguous() or p.dtype != torch.float32:
        return False
    return triton_support.available(p.device)  # CUDA, or CPU under TRITON_INTERPRET=1


def _hyper(lr, weight_decay, beta1, beta2, step) -> tuple:
    """(decay, step_size, bc2_sqrt) of one step, from Python numbers (float64 arithmetic)."""
    return 1 - lr * weight_decay, lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step)


def _update_reference(p, g, m, v, decay, step_size, bc2_sqrt, beta1, beta2, eps) -> None:
    # decay, step_size, bc2_sqrt: Python floats or 0-d float32 tensors (the capturable path)
    pf = p.float()
    gf, mf, vf = g.float(), m.float(), v.float()
    pf.mul_(decay)
    mf.add_(gf - mf, alpha=1 - beta1)
    vf.mul_(beta2).add_(gf * gf, alpha=1 - beta2)
    denom = vf.sqrt().div_(bc2_sqrt).add_(eps)
    pf.sub_((mf / denom).mul_(step_size))
    p.copy_(pf)
    m.copy_(mf)
    v.copy_(vf)


def adamw_update_reference(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step) -> None:
    """One AdamW step in place on p (any float dtype) with BF16 m, v; FP32 arithmetic."""
    _update_reference(p, g, m, v, *_hyper(lr, weight_decay, beta1, beta2, step), beta1, beta2, eps)


def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step, impl: str = "auto") -> None:
    """In-place AdamW step: the Triton kernel where it runs (impl="auto"/"triton"), else the reference."""
    if impl == "reference" or (impl == "auto" and not _use_triton(p, g)):
        return adamw_update_reference(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                      weight_decay=weight_decay, step=step)
    decay, step_size, bc2_sqrt = _hyper(lr, weight_decay, beta1, beta2, step)
    _launch(p, g, m, v, decay, step_size, bc2_sqrt, beta1, beta2, eps, None)
    return None


def _launch(p, g, m, v, decay, step_size, bc2_sqrt, beta1, beta2, eps, h) -> None:
    n = p.numel()
    if n == 0:
        return
    block = 1024
    from_ptr = h is not None
    _adamw_bf16_moments_kernel[(triton.cdiv(n, block),)](
        p, g, m, v, n, decay, beta1, beta2, step_size, bc2_sqrt, eps, h if from_ptr else p,
        BLOCK=block, HYPER_FROM_PTR=from_ptr, num_warps=4)


def adamw_update_device(p, g, m, v, h, *, beta1, beta2, eps, impl: str = "auto") -> None:
    """In-place AdamW step with h = (decay, step_size, bc2_sqrt) as a (3,) float32 tensor on p's device.

    Nothing is read back to the host, so a CUDA graph can capture it (Triton kernel, or the
    PyTorch reference where the kernel does not run).
    """
    if impl == "reference" or (impl == "auto" and not _use_triton(p, g)):
        return _update_reference(p, g, m, v, h[0], h[1], h[2], beta1, beta2, eps)
    _launch(p, g, m, v, 1.0, 1.0, 1.0, beta1, beta2, eps, h)
    return None


class AdamWBF16Moments(torch.optim.Optimizer):
    """torch.optim.AdamW's decoupled weight decay and bias correction, with BF16 exp_avg/exp_avg_sq.

    State per parameter: `step` (an int; a float32 device tensor when capturable), `exp_avg` and
    `exp_avg_sq` (BF16, the parameter's shape). No amsgrad, no maximize; closures are supported as
    in torch.optim. `capturable` (per group, as in torch.optim) makes `step()` free of host reads
    so that a CUDA graph can capture it; `lr` may then be a device tensor, changed in place.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, impl: str = "auto", capturable: bool = False):
        if impl not in ("auto", "triton", "reference"):
            raise ValueError(f"impl={impl!r}; choose auto, triton or reference")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      capturable=capturable))
        self.impl = impl

    def _init_state(self, p: torch.Tensor, capturable: bool) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=MOMENT_DTYPE, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=MOMENT_DTYPE, memory_format=torch.preserve_format)
        if capturable and not torch.is_tensor(state["step"]):
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=p.device)
        elif not capturable and torch.is_tensor(state["step"]):
            state["step"] = int(state["step"].item())
        return state

    def prepare_capture(self) -> None:
        """Make every group capturable and create its state now, outside the graph (an H2D copy of the
        step count is not allowed while a stream is being captured). Call after the first step."""
        for group in self.param_groups:
            group["capturable"] = True
            for p in group["params"]:
                self._init_state(p, True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWBF16Moments does not support sparse gradients")
            if not params:
                continue
            if group.get("capturable", False):
                self._step_on_device(group, params, beta1, beta2)
                continue
            for p in params:
                state = self._init_state(p, False)
                state["step"] += 1
                adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], beta1=beta1,
                             beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], step=state["step"],
                             impl=self.impl)
        return loss

    def _step_on_device(self, group: dict, params: list, beta1: float, beta2: float) -> None:
        states = [self._init_state(p, True) for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        t = torch.stack(steps).double()  # (P,) step counts, float64 like the host path's arithmetic
        lr = group["lr"]
        lr = lr.to(device=t.device, dtype=torch.float64) if torch.is_tensor(lr) else lr
        decay = (1 - lr * group["weight_decay"]) * torch.ones_like(t)
        step_size = lr / (1 - torch.pow(beta1, t))
        bc2_sqrt = torch.sqrt(1 - torch.pow(beta2, t))
        h = torch.stack([decay, step_size, bc2_sqrt], dim=1).float()  # (P, 3)
        for i, (p, state) in enumerate(zip(params, states)):
            adamw_update_device(p, p.grad, state["exp_avg"], state["exp_avg_sq"], h[i], beta1=beta1, beta2=beta2,
                                eps=group["eps"], impl=self.impl)

    def load_state_dict(self, state_dict) -> None:
        # torch.optim casts floating state to the parameter's dtype on load; the moments stay BF16,
        # and `step` takes the form its group wants (a device tensor only when capturable).
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key] = state[key].to(MOMENT_DTYPE)
                if "step" in state:
                    self._init_state(p, group.get("capturable", False))
